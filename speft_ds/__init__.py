"""speft-ds: salience-aware sparse fine-tuning of LLaMA-family models under DeepSpeed ZeRO-3."""

from .library_noise import silence_library_noise

silence_library_noise()

__all__ = ["load_adapter", "merge_adapter"]


def __getattr__(name: str):
    # Imported on first use: the command line checks its flags before torch and transformers load.
    if name in __all__:
        from .methods import adapters

        return getattr(adapters, name)
    raise AttributeError(f"module 'speft_ds' has no attribute '{name}'")
