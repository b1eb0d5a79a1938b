"""Which salience accumulator dtype keeps the selection: the gradient score accumulated over calibration
micro-batches in fp64 (the reference), fp32, bf16 and fp16, then the same global top-k.

    python bench/quality/accumulator_dtype.py [--layers 2] [--examples 64] [--density 0.01]

One process, a random LLaMA of the 124M model's width (--layers decoder layers), 256-token texts, one
example per micro-batch (the most accumulation steps). Prints, per dtype, how many of the k selected
entries differ from the fp64 selection, and how many of those are near-ties (|score - k-th score| within
1e-6 of it in the fp64 scores).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from bench.common.random_llama import LLAMA_124M, write_long_texts, write_random_model  # noqa: E402
from speft_ds.config import TrainConfig  # noqa: E402
from speft_ds.data.batches import pad_token_id, rank_batches, tokenize_dataset  # noqa: E402
from speft_ds.data.sources import load_raw_dataset  # noqa: E402
from speft_ds.methods.speft import shard_grads  # noqa: E402
from speft_ds.methods.speft.salience import ShardScores  # noqa: E402
from speft_ds.methods.speft.selection import num_to_select, select_global  # noqa: E402
from speft_ds.models.loading import find_targets, load_tokenizer  # noqa: E402

DTYPES = {"fp64": torch.float64, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--examples", type=int, default=64)
    parser.add_argument("--density", type=float, default=0.01)
    parser.add_argument("--work_dir", default="/tmp/speft-accumulator-dtype")
    args = parser.parse_args()
    work = Path(args.work_dir)
    model_dir, texts = work / f"llama-{args.layers}-layers", work / "texts.jsonl"
    if not (model_dir / "config.json").is_file():
        write_random_model(model_dir, {**LLAMA_124M, "num_hidden_layers": args.layers})
    write_long_texts(texts, n=args.examples)

    config = TrainConfig(model=str(model_dir), dataset=str(texts), text_field="text", seq_len=256)
    tokenizer = load_tokenizer(config)
    examples = tokenize_dataset(load_raw_dataset(config), tokenizer, config)
    batches = rank_batches(examples, list(range(len(examples))), 0, 1, 1, pad_token_id(tokenizer))
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).requires_grad_(False)
    targets = find_targets(model, None)
    k = num_to_select(args.density, None, sum(m.weight.numel() for m in targets.values()))

    selections, reference_scores = {}, None
    for label, dtype in DTYPES.items():
        grads = shard_grads.gradient(model, targets, batches, dtype=dtype)
        scores = {name: g.double().abs() for name, g in grads.items()}
        reference_scores = reference_scores or scores
        shards = {name: ShardScores(0, s.float(), s.numel(), s.numel()) for name, s in scores.items()}
        selections[label] = {name: set(t.tolist()) for name, t in select_global(shards, k).items()}

    flat = torch.cat(list(reference_scores.values()))
    kth = flat.sort(descending=True).values[k - 1]
    print(f"{args.layers} layers, {len(batches)} micro-batches of 1 x 256 tokens, k = {k:,} ({args.density:g})")
    print("| accumulator | selected entries differing from fp64 | of which near-ties |")
    print("|---|---|---|")
    for label, selection in selections.items():
        differing = [(name, i) for name in selection for i in selection[name] ^ selections["fp64"][name]]
        near = sum(abs(float(reference_scores[name][i]) - float(kth)) <= 1e-6 * float(kth) for name, i in differing)
        print(f"| {label} | {len(differing) // 2:,} | {near // 2:,} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
