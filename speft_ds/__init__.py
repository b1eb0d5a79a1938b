"""speft-ds: salience-aware sparse fine-tuning of LLaMA-family models under DeepSpeed ZeRO-3.

A reader starts at the top: recipe.py (the training recipe, phase by phase), config/ (every flag and its
default), cli.py and train.py (the entry point) and commands/ (the single-process tools). Below them each
folder imports only from the folders under it: methods/ (SPEFT, LoRA, RoseLoRA), data/, runtime/ (DeepSpeed,
processes, checkpoints, metrics), models/, and config/, which imports nothing of the package
(docs/architecture.md).
"""

from .runtime.library_noise import silence_library_noise

silence_library_noise()

__all__ = ["load_adapter", "merge_adapter"]


def __getattr__(name: str):
    # Imported on first use: the command line checks its flags before torch and transformers load.
    if name in __all__:
        from .methods import adapters

        return getattr(adapters, name)
    raise AttributeError(f"module 'speft_ds' has no attribute '{name}'")
