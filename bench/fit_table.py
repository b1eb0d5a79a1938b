"""What fits on 8 x 80 GB and 64 x 80 GB: the memory planner's per-GPU peaks for LLaMA-2 7B, 13B and 70B,
bf16 or nf4, with the shipped cluster and offload configs (density 1%, 2048-token sequences, gradient
checkpointing): each phase's peak at micro-batch 1, and the largest micro-batch whose peaks all fit.
Prints the markdown table the README shows.

    python bench/fit_table.py
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from speft_ds.memory_plan import PRESETS, Job, ModelShape, plan  # noqa: E402

MAX_MICRO_BATCH = 64
GPU_GIB = 80 * 10**9 / 2**30  # an "80 GB" GPU: 74.5 GiB
CONFIGS = {"z3_cluster.json": dict(offload_param=False, offload_optimizer=False, max_live_elements=int(1e9)),
           "z3_offload.json": dict(offload_param=True, offload_optimizer=True, max_live_elements=int(1e9))}


def _peaks(shape: ModelShape, world_size: int, quantize: str | None, memory: dict, micro_batch: int) -> dict:
    job = Job(world_size=world_size, density=0.01, seq_len=2048, micro_batch=micro_batch, quantize=quantize,
              gradient_checkpointing=True, **memory)
    return {phase: parts["peak"] / 2**30 for phase, parts in plan(shape, job).items()}


def _largest_micro_batch(shape: ModelShape, world_size: int, quantize: str | None, memory: dict) -> int:
    fits = [b for b in range(1, MAX_MICRO_BATCH + 1)
            if max(_peaks(shape, world_size, quantize, memory, b)[p] for p in ("load", "salience", "training")) <= GPU_GIB]
    return max(fits, default=0)


def main() -> None:
    print("| model | base | GPUs | config | load GiB | salience GiB | training GiB | host GiB / rank | "
          f"largest micro-batch (of {MAX_MICRO_BATCH}) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for model in PRESETS:
        shape = ModelShape.from_config(PRESETS[model])
        for quantize in (None, "nf4"):
            for world_size in (8, 64):
                for config, memory in CONFIGS.items():
                    peaks = _peaks(shape, world_size, quantize, memory, 1)
                    print(f"| {model} | {quantize or 'bf16'} | {world_size} | {config} | {peaks['load']:.1f} | "
                          f"{peaks['salience']:.1f} | {peaks['training']:.1f} | {peaks['host']:.1f} | "
                          f"{_largest_micro_batch(shape, world_size, quantize, memory)} |")


if __name__ == "__main__":
    main()
