"""Billion-parameter runs on this machine: a random-weight LLaMA of a real model's shape, 2 ranks, ZeRO-3 on CPU.

    python bench/memory/scale.py                                   # TinyLlama-1.1B's shape, fp32, 3 steps
    python bench/memory/scale.py --versus_one_pass 0.6 --bf16 --gradient_checkpointing   # a salience budget vs one pass
    python bench/memory/scale.py --shape llama-2-7b --quantize nf4 --seq_len 32 --calibration 4

Writes the random checkpoint once (bf16 safetensors shards of 1 GiB, generated and written one shard at a
time), then runs the ordinary training entry point on it: calibration, selection at density 0.01, a few
steps, a checkpoint after the last, eval, adapter save. Prints wall time per phase, peak RSS per rank,
each save's own wall time and peak RSS per rank over the RSS before it, the checkpoint's bytes, the
salience plan the run chose (groups, offload, planned peak) and the planner's peaks against the measured ones (run it with
MALLOC_MMAP_THRESHOLD_=1048576 to measure without what glibc keeps of freed blocks; docs/plan_check.md).

With --versus_one_pass F it runs the job twice: with one salience group, then with --max_memory_gib set
to F times the first run's measured salience peak per rank, and compares the two masks and times.
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

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from bench.common.random_llama import write_long_texts, write_random_model  # noqa: E402
from bench.memory.plan_check import peak_increase_mib  # noqa: E402
from speft_ds.config import SHIPPED_DS_CONFIG  # noqa: E402
from speft_ds.runtime.distributed import free_port  # noqa: E402
from speft_ds.runtime.memory_plan import PRESETS, Job, ModelShape, plan, zero_settings  # noqa: E402

SHAPES = {
    "tinyllama-1.1b": dict(hidden_size=2048, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
                           intermediate_size=5632, vocab_size=32000),
    "llama-2-7b": PRESETS["llama-7b"],
}
DENSITY, WORLD_SIZE = 0.01, 2
# ZeRO-3 keeps gathered weights resident up to stage3_max_live_parameters (DeepSpeed's default: 1e9
# elements, the whole 1.1B model, 4.4 GB per rank in fp32): cap it at 1e8 so 2 ranks fit in 24 GB.
MAX_LIVE_ELEMENTS = int(1e8)
MIB = 2**20


def _model(work: Path, shape: str) -> Path:
    model_dir = work / f"{shape}-random"
    if not (model_dir / "config.json").is_file():
        started = time.perf_counter()
        params = write_random_model(model_dir, dict(SHAPES[shape], max_position_embeddings=2048,
                                                    tie_word_embeddings=False, rms_norm_eps=1e-5))
        print(f"wrote a random {params / 1e9:.2f}B-parameter model in {time.perf_counter() - started:.0f} s")
    return model_dir


def run_job(args, work: Path, model_dir: Path, out: Path, extra: list[str]) -> tuple[list[dict], float]:
    """One training run; its metrics.jsonl records and wall time."""
    dataset, ds_config = work / "long.jsonl", work / "ds_config.json"
    write_long_texts(dataset)
    config = json.loads(SHIPPED_DS_CONFIG.read_text())
    config["zero_optimization"].update(stage3_max_live_parameters=MAX_LIVE_ELEMENTS,
                                       stage3_max_reuse_distance=MAX_LIVE_ELEMENTS)
    ds_config.write_text(json.dumps(config, indent=2))
    shutil.rmtree(out, ignore_errors=True)
    command = ["deepspeed", "--num_gpus", str(WORLD_SIZE), "--master_port", str(free_port()), "launch/train.py",
               "--model", str(model_dir), "--dataset", str(dataset), "--text_field", "text",
               "--seq_len", str(args.seq_len), "--calibration_examples", str(args.calibration),
               "--density", str(DENSITY), "--max_steps", str(args.steps), "--micro_batch_size", str(args.micro_batch),
               "--save_steps", str(args.steps),  # one checkpoint, after the last step
               "--logging_steps", "1", "--val_size", str(args.val_size), "--output_dir", str(out),
               "--ds_config", str(ds_config), "--bf16", "true" if args.bf16 else "false",
               *(["--gradient_checkpointing"] if args.gradient_checkpointing else []),
               *(["--quantize", args.quantize] if args.quantize else []), *extra]
    print(" ".join(command), flush=True)
    started = time.perf_counter()
    proc = subprocess.run(command, cwd=REPO, env={**os.environ, "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu")})
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"the run failed (exit code {proc.returncode})")
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()], wall


def report(args, records: list[dict], wall: float, out: Path) -> None:
    events = {r["event"]: r for r in records if "event" in r}
    steps = [r for r in records if "event" not in r]
    salience_plan = events["salience_plan"]
    print(f"\nk = {events['selection']['k']:,} trainable values; eval loss {events['eval']['eval_loss']:.3f}")
    print(f"salience plan: {salience_plan['chunks']} group(s), offload {salience_plan['offload']}, planned peak "
          f"{salience_plan['planned_peak_gib']:.2f} GiB per rank against a budget of "
          f"{salience_plan['max_memory_gib']:.2f} GiB; measured peak increase per rank "
          f"{', '.join(f'{g:.2f}' for g in events['salience_memory']['measured_peak_gib_per_rank'])} GiB")
    phases = [("load (ZeRO-3 partitioned)", events["load"]["wall_time_s"]),
              (f"salience ({args.calibration} x {args.seq_len} tokens)", events["salience"]["wall_time_s"]),
              ("selection (global top-k)", events["selection"]["wall_time_s"]),
              (f"training ({len(steps)} steps)", sum(r["step_time_s"] for r in steps)),
              ("adapter save", events["adapter"]["wall_time_s"])]
    print(f"{'phase':34} {'wall s':>8}")
    for name, seconds in phases:
        print(f"{name:34} {seconds:8.1f}")
    print(f"{'whole job (launcher to exit)':34} {wall:8.1f}")
    for event in ("checkpoint", "adapter"):
        saved = events[event]
        print(f"{event} save: {saved['wall_time_s']:.1f} s, peak RSS per rank over the RSS before it (MiB): "
              + ", ".join(f"{peak - before:,.0f}" for peak, before in zip(saved["peak_rss_mib_per_rank"],
                                                                       saved["rss_before_mib_per_rank"])))
    step_dir = out / "checkpoints" / f"step-{args.steps}"
    if step_dir.is_dir():
        files = sorted(step_dir.iterdir())
        print(f"checkpoint on disk: {sum(f.stat().st_size for f in files) / MIB:,.1f} MiB in {len(files)} files")
    for record in (r for r in records if r.get("event") == "memory" and r["phase"] != "start"):
        print(f"peak RSS per rank during {record['phase']:17} (MiB): "
              + ", ".join(f"{m:,.0f}" for m in record["peak_rss_mib_per_rank"]))
    zero = json.loads(SHIPPED_DS_CONFIG.read_text())["zero_optimization"]
    job = Job(world_size=WORLD_SIZE, density=DENSITY, seq_len=args.seq_len, micro_batch=args.micro_batch, bf16=args.bf16,
              quantize=args.quantize, gradient_checkpointing=args.gradient_checkpointing, **{**zero_settings(zero), "max_live_elements": MAX_LIVE_ELEMENTS})
    planned = plan(ModelShape.from_config(SHAPES[args.shape]), job)
    planned_peaks = {"load": planned["load"]["peak"] / MIB, "salience": salience_plan["planned_peak_gib"] * 1024,
                     "training": planned["training"]["peak"] / MIB}
    for phase, planned_mib in planned_peaks.items():
        measured = peak_increase_mib(records, phase)
        print(f"planner, {phase}: {planned_mib:,.0f} MiB planned / {measured:,.0f} MiB measured peak increase = "
              f"{planned_mib / measured:.2f}")


def same_masks(first: Path, second: Path) -> bool:
    from safetensors.torch import load_file

    a, b = (load_file(str(d / "adapter" / "adapter_model.safetensors")) for d in (first, second))
    indices = sorted(name for name in a if name.endswith(".indices"))
    return indices == sorted(name for name in b if name.endswith(".indices")) and all(
        a[name].equal(b[name]) for name in indices)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=SHAPES, default="tinyllama-1.1b")
    parser.add_argument("--quantize", choices=("nf4", "fp4", "int8"), default=None)
    parser.add_argument("--work_dir", default="/tmp/speft-scale")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--seq_len", type=int, default=256)
    parser.add_argument("--calibration", type=int, default=16, help="Calibration examples.")
    parser.add_argument("--micro_batch", type=int, default=1)
    parser.add_argument("--val_size", type=float, default=0.0625)
    parser.add_argument("--bf16", action="store_true", help="bf16 weights and compute (fp32 otherwise).")
    parser.add_argument("--gradient_checkpointing", action="store_true")
    parser.add_argument("--max_memory_gib", type=float, default=None)
    parser.add_argument("--salience_chunks", default="auto")
    parser.add_argument("--versus_one_pass", type=float, default=None, metavar="F",
                        help="Run once with one salience group, then with a budget of F x its measured peak.")
    args = parser.parse_args()
    work = Path(args.work_dir)
    model_dir = _model(work, args.shape)
    extra = ["--salience_chunks", args.salience_chunks]
    if args.max_memory_gib:
        extra += ["--max_memory_gib", str(args.max_memory_gib)]
    if args.versus_one_pass is None:
        records, wall = run_job(args, work, model_dir, work / "out", extra)
        report(args, records, wall, work / "out")
        return 0

    one, one_wall = run_job(args, work, model_dir, work / "out-one-pass", ["--salience_chunks", "1"])
    report(args, one, one_wall, work / "out-one-pass")
    peak = max(next(r for r in one if r.get("event") == "salience_memory")["measured_peak_gib_per_rank"])
    budget = round(args.versus_one_pass * peak, 3)
    bounded, bounded_wall = run_job(args, work, model_dir, work / "out-bounded", ["--max_memory_gib", str(budget)])
    report(args, bounded, bounded_wall, work / "out-bounded")
    salience = [next(r for r in records if r.get("event") == "salience") for records in (one, bounded)]
    measured = max(next(r for r in bounded if r.get("event") == "salience_memory")["measured_peak_gib_per_rank"])
    print(f"\none pass: salience peak {peak:.2f} GiB per rank, {salience[0]['wall_time_s']:.0f} s")
    print(f"budget {budget:.2f} GiB ({args.versus_one_pass:.0%} of it): {salience[1]['chunks']} groups, measured peak "
          f"{measured:.2f} GiB ({'under' if measured <= budget else 'OVER'} the budget), "
          f"{salience[1]['wall_time_s']:.0f} s ({salience[1]['wall_time_s'] / salience[0]['wall_time_s']:.2f}x one pass)")
    print(f"same mask as one pass: {same_masks(work / 'out-one-pass', work / 'out-bounded')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
