"""RoSA (Nikdan et al., ICML 2024): LoRA plus a sparse delta chosen per weight matrix by salience after a short
LoRA warm-up, trained together. Its method glue is method.py; its adapter (a LoRA part in PEFT's format and
a sparse part in SPEFT's, side by side) is adapter.py."""
