"""speft-ds: salience-aware sparse fine-tuning of LLaMA-family models under DeepSpeed ZeRO-3."""

from .adapter import load_adapter, merge_adapter

__all__ = ["load_adapter", "merge_adapter"]
