"""What the benches train on: random-weight LLaMA checkpoints of a given shape (bf16 safetensors shards of
1 GiB, generated and written one shard at a time, with the embedded tokenizer), and texts of about 256
tokens made of the embedded arithmetic problems."""

from __future__ import annotations

import json
from itertools import cycle
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import AutoTokenizer, LlamaConfig

from speft_ds.commands.merging import plan_shards, shard_file_name
from speft_ds.config import EMBEDDED_DATASET, EMBEDDED_MODEL
from speft_ds.models.loading import skeleton_model

SHARD_BYTES = 1 << 30
# The speed issue's ~124M LLaMA.
LLAMA_124M = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=4,
                  intermediate_size=2048, vocab_size=32000, tie_word_embeddings=False)
# ~1.1B: Llama-3.2-1B's decoder (hidden 2048, 16 layers, 32 heads, 8 KV heads, intermediate 8192) with a
# 32000-token vocabulary, for bench/gpu/gpu_bench.py.
LLAMA_1B = dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                intermediate_size=8192, vocab_size=32000, tie_word_embeddings=False)


def write_random_model(path: Path, dims: dict, device: str = "cpu") -> int:
    """Random N(0, 0.02) weights (norms at 1) for the config, shard by shard, drawn on `device` (a GPU draws
    a 7B model in seconds). Returns the parameter count."""
    tokenizer = AutoTokenizer.from_pretrained(EMBEDDED_MODEL)
    config = LlamaConfig(**dims, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    shapes = {name: p.shape for name, p in skeleton_model(config).state_dict().items()}
    path.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator(device=device).manual_seed(0)
    nbytes = {name: shape.numel() * 2 for name, shape in shapes.items()}  # bf16
    shards = plan_shards(list(shapes), nbytes, SHARD_BYTES)
    weight_map = {}
    for i, names in enumerate(shards):  # one shard in memory at a time
        tensors = {name: (torch.ones(shapes[name]) if name.endswith("norm.weight")
                          else torch.randn(shapes[name], generator=generator, device=device) * 0.02
                          ).to(torch.bfloat16).cpu() for name in names}
        file = shard_file_name(i, len(shards))
        save_file(tensors, str(path / file), metadata={"format": "pt"})
        weight_map.update({name: file for name in names})
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": sum(nbytes.values())}, "weight_map": weight_map}, indent=2))
    config.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return sum(s.numel() for s in shapes.values())


def write_long_texts(path: Path, n: int = 64, chars: int = 1100) -> None:
    """n texts of at least `chars` characters ({"text": ...} lines; 1100: about 256 tokens), made of the
    embedded arithmetic problems, taken again from the first once all are used."""
    lines = [json.loads(line) for line in EMBEDDED_DATASET.read_text().splitlines()]
    texts, text = [], ""
    for line in cycle(lines):
        text += f"{line['prompt']} {line['response']}\n"
        if len(text) >= chars:
            texts.append({"text": text})
            text = ""
            if len(texts) == n:
                break
    path.write_text("".join(json.dumps(t) + "\n" for t in texts))
