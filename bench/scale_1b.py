"""A 1.1B-parameter run on this machine: TinyLlama-1.1B's shape, random weights, 2 ranks, ZeRO-3 on CPU.

    python bench/scale_1b.py [--work_dir /tmp/speft-scale-1b] [--steps 3]

Writes a random-init checkpoint of the shape (once; bf16 safetensors shards of 1 GiB, generated and
written one shard at a time), then runs the ordinary training entry point on it:
calibration (16 examples of 256 tokens), selection at density 0.01, a few steps, eval, adapter save.
Prints wall time per phase and peak RSS per rank, from the run's metrics.jsonl, and the memory
planner's peaks against the measured ones (run it with MALLOC_MMAP_THRESHOLD_=1048576 to measure without
what glibc keeps of freed blocks; see docs/plan_check.md).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.plan_check import peak_increase_mib  # noqa: E402
from bench.random_llama import write_long_texts, write_random_model  # noqa: E402
from speft_ds.config import SHIPPED_DS_CONFIG  # noqa: E402
from speft_ds.distributed import free_port  # noqa: E402
from speft_ds.memory_plan import Job, ModelShape, plan  # noqa: E402

TINYLLAMA_1B = dict(hidden_size=2048, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
                    intermediate_size=5632, vocab_size=32000, max_position_embeddings=2048,
                    tie_word_embeddings=False, rms_norm_eps=1e-5)
SEQ_LEN, MICRO_BATCH, DENSITY, WORLD_SIZE = 256, 1, 0.01, 2
# ZeRO-3 keeps gathered weights resident up to stage3_max_live_parameters (DeepSpeed's default: 1e9
# elements, the whole model here, 4.4 GB per rank in fp32): cap it at 1e8 so 2 ranks fit in 24 GB.
MAX_LIVE_ELEMENTS = int(1e8)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work_dir", default="/tmp/speft-scale-1b")
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    work = Path(args.work_dir)
    model_dir, dataset, out = work / "tinyllama-1.1b-random", work / "long.jsonl", work / "out"

    started = time.perf_counter()
    if not (model_dir / "config.json").is_file():
        params = write_random_model(model_dir, TINYLLAMA_1B)
        print(f"wrote a random {params / 1e9:.2f}B-parameter model in {time.perf_counter() - started:.0f} s")
    write_long_texts(dataset)
    ds_config = json.loads(SHIPPED_DS_CONFIG.read_text())
    ds_config["zero_optimization"].update(stage3_max_live_parameters=MAX_LIVE_ELEMENTS,
                                          stage3_max_reuse_distance=MAX_LIVE_ELEMENTS)
    (work / "ds_config.json").write_text(json.dumps(ds_config, indent=2))
    shutil.rmtree(out, ignore_errors=True)
    command = ["deepspeed", "--num_gpus", str(WORLD_SIZE), "--master_port", str(free_port()), "launch/train.py",
               "--model", str(model_dir), "--dataset", str(dataset), "--text_field", "text", "--seq_len", str(SEQ_LEN),
               "--calibration_examples", "16", "--density", str(DENSITY), "--max_steps", str(args.steps),
               "--micro_batch_size", str(MICRO_BATCH), "--logging_steps", "1", "--val_size", "0.0625", "--output_dir", str(out),
               "--ds_config", str(work / "ds_config.json")]
    print(" ".join(command))
    run_started = time.perf_counter()
    proc = subprocess.run(command, cwd=REPO, env={**os.environ, "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu")})
    wall = time.perf_counter() - run_started
    if proc.returncode != 0:
        print(f"the run failed (exit code {proc.returncode})", file=sys.stderr)
        return proc.returncode

    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    events = {r["event"]: r for r in records if "event" in r}
    steps = [r for r in records if "step" in r]
    phases = [("load (ZeRO-3 partitioned)", events["load"]["wall_time_s"]),
              ("salience (16 x 256 tokens)", events["salience"]["wall_time_s"]),
              ("selection (global top-k)", events["selection"]["wall_time_s"]),
              (f"training ({len(steps)} steps)", sum(r["step_time_s"] for r in steps)),
              ("adapter save", events["adapter"]["wall_time_s"])]
    print(f"\nk = {events['selection']['k']:,} trainable values; eval loss {events['eval']['eval_loss']:.3f}")
    print(f"{'phase':32} {'wall s':>8}")
    for name, seconds in phases:
        print(f"{name:32} {seconds:8.1f}")
    print(f"{'whole job (launcher to exit)':32} {wall:8.1f}")
    for record in (r for r in records if r.get("event") == "memory" and r["phase"] != "start"):
        print(f"peak RSS per rank during {record['phase']:17} (MiB): "
              + ", ".join(f"{m:,.0f}" for m in record["peak_rss_mib_per_rank"]))
    planned = plan(ModelShape.from_config(TINYLLAMA_1B),
                   Job(world_size=WORLD_SIZE, density=DENSITY, seq_len=SEQ_LEN, micro_batch=MICRO_BATCH, bf16=False,
                       max_live_elements=MAX_LIVE_ELEMENTS))
    for phase in ("salience", "training"):
        measured = peak_increase_mib(records, phase)
        print(f"planner, {phase}: {planned[phase]['peak'] / 2**20:,.0f} MiB planned / {measured:,.0f} MiB measured "
              f"peak increase = {planned[phase]['peak'] / 2**20 / measured:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
