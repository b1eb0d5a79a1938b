"""speft-ds: salience-aware sparse fine-tuning of LLaMA-family models under DeepSpeed ZeRO-3."""

from .library_noise import silence_library_noise

silence_library_noise()

from .methods.adapters import load_adapter, merge_adapter  # noqa: E402

__all__ = ["load_adapter", "merge_adapter"]
