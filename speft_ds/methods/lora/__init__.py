"""LoRA (HF PEFT's LoraConfig semantics: r, alpha, dropout, target modules) on the same engine, checkpoints,
resume and merge as SPEFT; its layers are PEFT's own, its adapter PEFT's format."""
