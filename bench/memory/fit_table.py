"""What fits where, from the memory planner (density 1%, 2048-token sequences, gradient checkpointing):

- 8 x 80 GB and 64 x 80 GB: per-GPU peaks for LLaMA-2 7B, 13B and 70B, bf16 or nf4, with the shipped cluster
  and offload configs: each phase's peak at micro-batch 1, and the largest micro-batch whose peaks all fit
  (the README's table), with the host memory per rank while saving and a checkpoint's size on disk;
- the salience pass on small boxes (docs/salience_memory.md): the one-pass peak, the fewest groups of
  targeted weights that fit the GPU with the accumulators on it, and the offload alternative.

    python bench/memory/fit_table.py
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from dataclasses import replace  # noqa: E402

from speft_ds.runtime.memory_plan import (PRESETS, Job, ModelShape, NoSaliencePlanFits, checkpoint_bytes,  # noqa: E402
                                          choose_salience, plan, salience_time)

MAX_MICRO_BATCH = 64
GPU_GIB = 80 * 10**9 / 2**30  # an "80 GB" GPU: 74.5 GiB
CONFIGS = {"z3_cluster.json": dict(offload_param=False, offload_optimizer=False, max_live_elements=int(1e9)),
           "z3_offload.json": dict(offload_param=True, offload_optimizer=True, max_live_elements=int(1e9))}


def _peaks(shape: ModelShape, world_size: int, quantize: str | None, memory: dict, micro_batch: int) -> dict:
    job = Job(world_size=world_size, density=0.01, seq_len=2048, micro_batch=micro_batch, quantize=quantize,
              gradient_checkpointing=True, **memory)
    return {**{phase: parts["peak"] / 2**30 for phase, parts in plan(shape, job).items()},
            "checkpoint": checkpoint_bytes(shape, job) / 2**30}


def _fits(shape: ModelShape, world_size: int, quantize: str | None, memory: dict, micro_batch: int) -> bool:
    """Load and training fit, and the salience pass does in some number of groups (accumulators on the GPU)."""
    job = Job(world_size=world_size, density=0.01, seq_len=2048, micro_batch=micro_batch, quantize=quantize,
              gradient_checkpointing=True, **memory)
    peaks = plan(shape, job)
    if max(peaks["load"]["peak"], peaks["training"]["peak"]) > GPU_GIB * 2**30:
        return False
    try:
        choose_salience(shape, job, GPU_GIB * 2**30, float("inf"), None, False)
    except NoSaliencePlanFits:
        return False
    return True


def _largest_micro_batch(shape: ModelShape, world_size: int, quantize: str | None, memory: dict) -> int:
    return max((b for b in range(1, MAX_MICRO_BATCH + 1) if _fits(shape, world_size, quantize, memory, b)), default=0)


# (model, base, GPUs, GB per GPU, ds_config's memory settings)
SMALL_BOXES = [("llama-7b", "nf4", 1, 24, CONFIGS["z3_cluster.json"]), ("llama-13b", "nf4", 1, 48, CONFIGS["z3_cluster.json"]),
               ("llama-70b", "nf4", 2, 80, CONFIGS["z3_cluster.json"]), ("llama-70b", None, 8, 80, CONFIGS["z3_cluster.json"])]


def salience_table() -> list[str]:
    rows = ["| model | base | GPUs | one pass: salience GiB | groups that fit | their salience GiB | compute vs one pass "
            "| or 1 group offloaded: GPU GiB + host GiB / rank | training GiB |", "|---|---|---|---|---|---|---|---|---|"]
    for model, quantize, gpus, gb, memory in SMALL_BOXES:
        shape = ModelShape.from_config(PRESETS[model])
        job = Job(world_size=gpus, density=0.01, seq_len=2048, micro_batch=1, quantize=quantize,
                  gradient_checkpointing=True, **memory)
        budget = gb * 10**9
        grouped = choose_salience(shape, job, budget, float("inf"), None, False)
        offloaded = plan(shape, replace(job, salience_offload=True))
        one, chosen = plan(shape, job), plan(shape, grouped)
        rows.append(f"| {model} | {quantize or 'bf16'} | {gpus} x {gb} GB | {one['salience']['peak'] / 2**30:.1f} | "
                    f"{grouped.salience_chunks} | {chosen['salience']['peak'] / 2**30:.1f} | "
                    f"{salience_time(shape, grouped):.2f}x | {offloaded['salience']['peak'] / 2**30:.1f} + "
                    f"{offloaded['salience host']['peak'] / 2**30:.1f} | {one['training']['peak'] / 2**30:.1f} |")
    return rows


def main() -> None:
    print("| model | base | GPUs | config | load GiB | salience GiB | training GiB | host GiB / rank | "
          f"largest micro-batch (of {MAX_MICRO_BATCH}) | saving: host GiB / rank | checkpoint GiB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for model in PRESETS:
        shape = ModelShape.from_config(PRESETS[model])
        for quantize in (None, "nf4"):
            for world_size in (8, 64):
                for config, memory in CONFIGS.items():
                    peaks = _peaks(shape, world_size, quantize, memory, 1)
                    print(f"| {model} | {quantize or 'bf16'} | {world_size} | {config} | {peaks['load']:.1f} | "
                          f"{peaks['salience']:.1f} | {peaks['training']:.1f} | "
                          f"{max(peaks['salience host'], peaks['training host']):.1f} | "
                          f"{_largest_micro_batch(shape, world_size, quantize, memory)} | "
                          f"{peaks['saves host']:.2f} | {peaks['checkpoint']:.1f} |")


    print()
    print("\n".join(salience_table()))


if __name__ == "__main__":
    main()
