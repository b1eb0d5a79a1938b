"""Small LLaMA models for tests, written as ordinary HF model directories."""

from itertools import islice
from pathlib import Path

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase

from speft_ds.config import EMBEDDED_DATASET, EMBEDDED_MODEL


def write_tiny_llama(path: Path, num_layers: int = 2, seed: int = 0, max_shard_size: str | None = None,
                     hidden_size: int = 33, intermediate_size: int = 45,
                     tokenizer: PreTrainedTokenizerBase | None = None) -> Path:
    """hidden 33 / intermediate 45: the MLP weights have an odd element count, so 2-rank partitions pad.
    (bitsandbytes' 4-bit layers need even element counts: give other sizes for quantized bases.)
    With `max_shard_size` the weights are split over several safetensors files plus an index.
    `tokenizer` replaces the embedded one (the vocabulary size follows it)."""
    if tokenizer is None:
        tokenizer = AutoTokenizer.from_pretrained(EMBEDDED_MODEL)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=intermediate_size, head_dim=8,
                         num_hidden_layers=num_layers, num_attention_heads=3, num_key_value_heads=1,
                         max_position_embeddings=128, tie_word_embeddings=False,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(path, safe_serialization=True, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    tokenizer.save_pretrained(path)
    return path


def write_dataset(path: Path, n: int) -> Path:
    """The first n examples of the embedded dataset, as a .jsonl file."""
    with EMBEDDED_DATASET.open() as lines:
        path.write_text("".join(islice(lines, n)))
    return path


def tiny_job(root: Path, n_examples: int) -> tuple[Path, Path, Path]:
    """(root, tiny LLaMA directory, dataset file) for a training job under `root`."""
    return root, write_tiny_llama(root / "llama"), write_dataset(root / "data.jsonl", n_examples)
