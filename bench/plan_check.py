"""The memory planner against measured peaks: a ~124M LLaMA (the speed issue's shape), 1 and 2 ranks,
ZeRO-3 on CPU (fp32), micro-batch 4 x 256 tokens, density 0.01, all decoder linears.

    python bench/plan_check.py [--work_dir /tmp/speft-plan-check]

For the salience pass and for training, it prints the planner's per-rank peak next to the measured
peak RSS increase per rank (the phase's VmHWM minus the RSS before the model was loaded), and their
ratio; the table goes to docs/plan_check.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.random_llama import LLAMA_124M, write_long_texts, write_random_model  # noqa: E402
from speft_ds.config import SHIPPED_DS_CONFIG  # noqa: E402
from speft_ds.distributed import free_port  # noqa: E402
from speft_ds.ds_config import read_ds_config  # noqa: E402
from speft_ds.memory_plan import Job, ModelShape, plan  # noqa: E402

SEQ_LEN, MICRO_BATCH, DENSITY = 256, 4, 0.01


def measure(model_dir: Path, dataset: Path, out: Path, world_size: int) -> dict[str, float]:
    """Per phase, the largest per-rank peak RSS increase over the RSS before loading, in bytes."""
    shutil.rmtree(out, ignore_errors=True)
    command = ["deepspeed", "--num_gpus", str(world_size), "--master_port", str(free_port()), "launch/train.py",
               "--model", str(model_dir), "--dataset", str(dataset), "--text_field", "text",
               "--seq_len", str(SEQ_LEN), "--micro_batch_size", str(MICRO_BATCH), "--calibration_examples", "16",
               "--density", str(DENSITY), "--max_steps", "3", "--val_size", "0.1", "--output_dir", str(out)]
    subprocess.run(command, cwd=REPO, check=True, env={**os.environ, "DS_ACCELERATOR": "cpu"})
    memory = {r["phase"]: r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
              if r.get("event") == "memory"}
    start = memory["start"]["rss_mib_per_rank"]
    return {phase: max(p - s for p, s in zip(memory[phase]["peak_rss_mib_per_rank"], start)) * 2**20
            for phase in ("salience", "training")}


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
    rows = []
    for world_size in (1, 2):
        measured = measure(model_dir, dataset, work / f"out-{world_size}", world_size)
        planned = plan(shape, Job(world_size=world_size, density=DENSITY, seq_len=SEQ_LEN, micro_batch=MICRO_BATCH,
                                  bf16=False, max_live_elements=int(zero.get("stage3_max_live_parameters", 1e9))))
        for phase in ("salience", "training"):
            rows.append((world_size, phase, planned[phase]["peak"], measured[phase]))
    table = ["| ranks | phase | planned MiB | measured MiB | planned / measured |", "|---|---|---|---|---|"]
    table += [f"| {n} | {phase} | {p / 2**20:,.0f} | {m / 2**20:,.0f} | {p / m:.2f} |" for n, phase, p, m in rows]
    print("\n".join(table))
    (REPO / "docs" / "plan_check.md").write_text(
        "# Memory planner vs measured peaks\n\n`python bench/plan_check.py` on the 2-core CPU machine: a ~124M "
        "LLaMA (hidden 768, 12 layers, 12 heads, 4 KV heads, intermediate 2048, vocab 32000), fp32, ZeRO-3, "
        f"micro-batch {MICRO_BATCH} x {SEQ_LEN} tokens, density {DENSITY}. Measured: the phase's peak RSS "
        "(VmHWM, reset per phase) minus the RSS before loading, the larger rank.\n\n" + "\n".join(table) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
