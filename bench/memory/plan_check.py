"""The memory planner against measured peaks: a ~124M LLaMA (the speed issue's shape), 1 and 2 ranks,
ZeRO-3 on CPU (fp32), micro-batch 4 x 256 tokens, density 0.01, all decoder linears; then the salience
pass in 1, 2 and 4 groups and with offloaded accumulators.

    python bench/memory/plan_check.py [--work_dir /tmp/speft-plan-check]

For the salience pass and for training, it prints the planner's per-rank peak next to the measured
peak RSS increase per rank (the phase's VmHWM minus the RSS before the model was loaded), and their
ratio; the table goes to docs/plan_check.md.

The planner counts tensors. glibc's malloc, by default, raises its mmap threshold after freeing a large
block, so later blocks of up to 32 MiB (activations, gathered weights) come from the heap, where freed
ones stay resident; each job is therefore measured twice: with glibc's default, and with the threshold
fixed at 1 MiB (MALLOC_MMAP_THRESHOLD_), which hands such blocks back as they are freed. The median step
time of each shows what the second costs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from bench.common.random_llama import LLAMA_124M, write_long_texts, write_random_model  # noqa: E402
from speft_ds.config import SHIPPED_DS_CONFIG  # noqa: E402
from speft_ds.runtime.distributed import free_port  # noqa: E402
from speft_ds.runtime.ds_config import read_ds_config  # noqa: E402
from speft_ds.runtime.memory_plan import Job, ModelShape, plan  # noqa: E402

SEQ_LEN, MICRO_BATCH, DENSITY, STEPS = 256, 4, 0.01, 5
ALLOCATORS = {"glibc default": {}, "mmap threshold 1 MiB": {"MALLOC_MMAP_THRESHOLD_": str(2**20)}}
SALIENCE_PLANS = [("1", "none"), ("2", "none"), ("4", "none"), ("1", "cpu")]  # (--salience_chunks, --salience_offload)


def peak_increase_mib(records: list[dict], phase: str) -> float:
    """The largest per-rank increase of a phase's peak RSS over the RSS before loading, from metrics.jsonl."""
    memory = {r["phase"]: r for r in records if r.get("event") == "memory"}
    return max(p - s for p, s in zip(memory[phase]["peak_rss_mib_per_rank"], memory["start"]["rss_mib_per_rank"]))


def measure(model_dir: Path, dataset: Path, out: Path, world_size: int, env: dict[str, str], steps: int = STEPS,
            extra: tuple[str, ...] = ()) -> dict[str, float]:
    """Per phase, the largest per-rank peak RSS increase over the RSS before loading, in bytes; the median
    step time after the first step, in seconds; the salience pass's planned peak (bytes) and wall time."""
    shutil.rmtree(out, ignore_errors=True)
    command = ["deepspeed", "--num_gpus", str(world_size), "--master_port", str(free_port()), "launch/train.py",
               "--model", str(model_dir), "--dataset", str(dataset), "--text_field", "text",
               "--seq_len", str(SEQ_LEN), "--micro_batch_size", str(MICRO_BATCH), "--calibration_examples", "16",
               "--density", str(DENSITY), "--max_steps", str(steps), "--val_size", "0.1", "--output_dir", str(out),
               *extra]
    subprocess.run(command, cwd=REPO, check=True, env={**os.environ, **env, "DS_ACCELERATOR": "cpu"})
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    events = {r["event"]: r for r in records if "event" in r}
    result = {phase: peak_increase_mib(records, phase) * 2**20 for phase in ("salience", "training")}
    steps_after_first = [r["step_time_s"] for r in records if "step_time_s" in r and r["step"] > 1]
    result["step_s"] = statistics.median(steps_after_first) if steps_after_first else float("nan")
    result["planned_salience"] = events["salience_plan"]["planned_peak_gib"] * 2**30
    result["salience_s"] = events["salience"]["wall_time_s"]
    return result


def salience_plans(model_dir: Path, dataset: Path, work: Path) -> list[str]:
    """The salience pass in 1, 2 and 4 groups and with offloaded accumulators, 2 ranks, glibc's mmap threshold
    at 1 MiB: the run's own planned peak against the measured one, and its time against one pass."""
    table = ["| salience plan | planned MiB | measured MiB | planned / measured | salience s | vs one pass |",
             "|---|---|---|---|---|---|"]
    baseline = None
    for chunks, offload in SALIENCE_PLANS:
        m = measure(model_dir, dataset, work / f"out-salience-{chunks}-{offload}", 2, ALLOCATORS["mmap threshold 1 MiB"],
                    steps=1, extra=("--salience_chunks", chunks, "--salience_offload", offload))
        baseline = baseline or m["salience_s"]
        table.append(f"| {chunks} group{'s' if chunks != '1' else ''}{', offload' if offload == 'cpu' else ''} | "
                     f"{m['planned_salience'] / 2**20:,.0f} | {m['salience'] / 2**20:,.0f} | "
                     f"{m['planned_salience'] / m['salience']:.2f} | {m['salience_s']:.0f} | "
                     f"{m['salience_s'] / baseline:.2f}x |")
    return table


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work_dir", default="/tmp/speft-plan-check")
    args = parser.parse_args()
    work = Path(args.work_dir)
    model_dir, dataset = work / "llama-124m-random", work / "texts.jsonl"
    if not (model_dir / "config.json").is_file():
        write_random_model(model_dir, LLAMA_124M)
    write_long_texts(dataset)

    shape = ModelShape.from_config(json.loads((model_dir / "config.json").read_text()))
    zero = read_ds_config(str(SHIPPED_DS_CONFIG))["zero_optimization"]
    names = list(ALLOCATORS)
    table = ["| ranks | phase | planned MiB | " + " | ".join(f"measured MiB, {a} | planned / measured" for a in names)
             + " |", "|---|---|---|" + "---|---|" * len(names)]
    steps = []
    for world_size in (1, 2):
        measured = {a: measure(model_dir, dataset, work / f"out-{world_size}", world_size, env)
                    for a, env in ALLOCATORS.items()}
        planned = plan(shape, Job(world_size=world_size, density=DENSITY, seq_len=SEQ_LEN, micro_batch=MICRO_BATCH,
                                  bf16=False, max_live_elements=int(zero.get("stage3_max_live_parameters", 1e9))))
        for phase in ("salience", "training"):
            p = planned[phase]["peak"]
            table.append(f"| {world_size} | {phase} | {p / 2**20:,.0f} | "
                         + " | ".join(f"{measured[a][phase] / 2**20:,.0f} | {p / measured[a][phase]:.2f}" for a in names)
                         + " |")
        steps.append(f"{world_size} rank{'s' if world_size > 1 else ''}: "
                     + ", ".join(f"{measured[a]['step_s']:.2f} s ({a})" for a in names))
    salience = salience_plans(model_dir, dataset, work)
    print("\n".join(table + [""] + steps + [""] + salience))
    (REPO / "docs" / "plan_check.md").write_text(
        "# Memory planner vs measured peaks\n\n`python bench/memory/plan_check.py` on the 2-core CPU machine: a ~124M "
        "LLaMA (hidden 768, 12 layers, 12 heads, 4 KV heads, intermediate 2048, vocab 32000), fp32, ZeRO-3, "
        f"micro-batch {MICRO_BATCH} x {SEQ_LEN} tokens, density {DENSITY}, {STEPS} steps. Measured: the phase's "
        "peak RSS (VmHWM, reset per phase) minus the RSS before loading, the larger rank; once with glibc's "
        "default malloc settings, once with `MALLOC_MMAP_THRESHOLD_=1048576`, under which freed blocks of 1 MiB "
        "and more go back to the OS instead of staying in the heap.\n\n" + "\n".join(table)
        + "\n\nMedian training step time (steps 2-" + str(STEPS) + "), which the fixed threshold costs:\n\n"
        + "\n".join(f"- {line}" for line in steps) + "\n\n"
        "The salience pass in groups of targeted weights (`--salience_chunks`) and with its accumulators in host "
        "memory (`--salience_offload cpu`; on CPU, host memory is the only memory, so the planned peak counts both "
        "parts), 2 ranks, `MALLOC_MMAP_THRESHOLD_=1048576`, one training step; planned: the run's own "
        "`salience_plan` record; measured: the salience phase's peak RSS increase (selection included):\n\n"
        + "\n".join(salience) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
