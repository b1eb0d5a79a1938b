"""The 7B promise on one GPU: a random-weight model of LLaMA-2-7B's shape, written on the GPU machine (no
download), trained by bench/common/compare_worker.py jobs under ZeRO-3 on 1 GPU. Two parts, one device run each:

  nf4   the base quantized to nf4, the process capped at 24 GiB (torch's per-process memory fraction) and
        --max_memory_gib 22: SPEFT end to end (salience in the groups `auto` picks, selection, training,
        adapter save) against QLoRA (--peft lora --quantize nf4) at the same trainable count, 2048 tokens,
        micro-batch 1, gradient checkpointing. Per phase: wall time and torch's peak allocated memory beside
        the planner's figure; training tokens per second; the whole job's time.
  bf16  bf16 at a compute-bound size (2048 tokens, micro-batch BF16_MICRO_BATCH): SPEFT with the dense and
        the sparse delta against LoRA at equal trainable count: tokens per second, step time over LoRA's,
        peak memory and model FLOP utilisation (6 x parameters x tokens / step time over the bf16 matmul
        rate measured here with a plain matmul, stated beside it); SPEFT's selection against its salience
        pass.

Each part appends a dated section to docs/gpu_checks.md and copies it and the jobs' logs to $OUT.

    python bench/gpu/gpu_scale.py --dry_run         # on CPU: both parts' jobs at tiny shapes, fp32, no cap
    bash bench/gpu/gpu_scale.sh nf4                 # on the device: installs the carried wheels, then this

The device tool's call (after `python bench/gpu/gpu_wheels.py` here): command "bash bench/gpu/gpu_scale.sh nf4",
carry [".whl"], timeout_s 450; then the same with "bf16". Give the machine back between them if the first
fails.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from bench.common.jobs import target_sizes  # noqa: E402
from bench.common.random_llama import write_long_texts, write_random_model  # noqa: E402
from bench.gpu.gpu_bench import versions  # noqa: E402
from speft_ds.runtime.distributed import free_port  # noqa: E402
from speft_ds.runtime.memory_plan import PRESETS, Job, ModelShape, plan  # noqa: E402

GIB = 2**30
LLAMA_7B = {**PRESETS["llama-7b"], "tie_word_embeddings": False}
TINY = dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
            vocab_size=512, tie_word_embeddings=False)
CAP_GIB, MAX_MEMORY_GIB, LORA_R, BF16_MICRO_BATCH = 24, 22, 16, 4


def settings(part: str, dry_run: bool) -> dict:
    """What a part runs: shape, tokens, steps (the first is a warm-up, left out of the median), flags."""
    common = {"shape": TINY if dry_run else LLAMA_7B, "seq_len": 64 if dry_run else 2048,
              "steps": 3 if dry_run else (21 if part == "nf4" else 6), "lora_r": 2 if dry_run else LORA_R,
              "calibration": 4 if dry_run else 32, "accelerator": "cpu" if dry_run else "cuda",
              "precision": [] if dry_run else ["--bf16", "true"]}
    if part == "nf4":
        return {**common, "micro_batch": 1, "cap_gib": None if dry_run else CAP_GIB,
                "flags": ["--quantize", "nf4", "--max_memory_gib", str(MAX_MEMORY_GIB)],
                "methods": {"SPEFT (nf4)": ("speft", []), "QLoRA": ("lora", [])}}
    return {**common, "micro_batch": 2 if dry_run else BF16_MICRO_BATCH, "cap_gib": None, "flags": [],
            "methods": {"SPEFT, dense delta": ("speft", ["--delta_impl", "dense"]),
                        "SPEFT, sparse delta": ("speft", ["--delta_impl", "sparse"]), "LoRA": ("lora", [])}}


def run_job(name: str, method: str, flags: list[str], s: dict, model: Path, data: Path, work: Path,
            seconds: float) -> dict | str:
    """One compare_worker job on 1 rank within `seconds`; its result, or why it failed (its log is kept)."""
    if seconds < 30:
        return "not run: the part's time was spent"
    tag = name.lower().replace(" ", "-").replace(",", "").replace("(", "").replace(")", "")
    _, in_plus_out = target_sizes(model)
    rank = ["--lora_r", str(s["lora_r"])] if method == "lora" else []  # the worker's flag
    # SPEFT's, the same count, and its calibration set
    k = [] if method == "lora" else ["--num_trainable", str(s["lora_r"] * in_plus_out), "--calibration_examples",
                                     str(s["calibration"])]
    result, log = work / f"{tag}.json", work / f"{tag}.log"
    command = ["deepspeed", "--num_gpus", "1", "--master_port", str(free_port()), "bench/common/compare_worker.py",
               "--method", method, "--result", str(result), "--warmup_steps_excluded", "1",
               *(["--memory_cap_gib", str(s["cap_gib"])] if s["cap_gib"] else []),
               *rank, "--",
               "--model", str(model), "--dataset", str(data), "--text_field", "text", "--packing",
               "--seq_len", str(s["seq_len"]), "--micro_batch_size", str(s["micro_batch"]),
               "--max_steps", str(s["steps"]), "--logging_steps", "1", "--learning_rate", "1e-4",
               "--gradient_checkpointing", "--val_size", "0.05",
               "--eval_task", "none", "--output_dir", str(work / tag), "--overwrite_output_dir",
               *s["precision"], *s["flags"], *k, *flags]
    started = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.Popen(command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "DS_ACCELERATOR": s["accelerator"]})
        try:
            proc.wait(timeout=seconds)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)  # the launcher and its rank
            proc.wait()
            return f"timed out after {seconds:.0f} s"
    if proc.returncode != 0:
        tail = [line for line in log.read_text().splitlines() if line.strip()][-1:] or ["no output"]
        return f"failed (exit {proc.returncode}): {tail[0][:160]}"
    return {**json.loads(result.read_text()), "job_s": time.perf_counter() - started}


def matmul_tflops(device: str, dtype: torch.dtype, n: int) -> float:
    """The dense matmul rate this device sustains: the median of 10 timed n x n products after a warm-up."""
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    times = []
    for i in range(13):
        if device == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        if i >= 3:
            times.append(time.perf_counter() - started)
    return 2 * n**3 / statistics.median(times) / 1e12


def planned_gib(s: dict, part: str, density: float) -> dict[str, float]:
    """The planner's per-rank peak of each phase for SPEFT's job."""
    job = Job(world_size=1, density=density, seq_len=s["seq_len"], micro_batch=s["micro_batch"],
              bf16=bool(s["precision"]), quantize="nf4" if part == "nf4" else None, gradient_checkpointing=True)
    return {phase: parts["peak"] / GIB for phase, parts in plan(ModelShape.from_config(s["shape"]), job).items()}


def _peak(r: dict, phase: str) -> str:
    """torch's peak allocated memory in a memory record's phase (GiB), or the RSS peak on CPU."""
    record = next((m for m in r.get("memory", []) if m["phase"] == phase), None)
    if record is None:
        return ""
    values = record.get("device_peak_mib_per_rank") or record["peak_rss_mib_per_rank"]
    return f"{max(values) / 1024:.2f}"


def tokens_per_s(r: dict, s: dict) -> float:
    return s["micro_batch"] * s["seq_len"] / r["median_step_s"]


def nf4_rows(results: dict, s: dict, density: float) -> list[str]:
    planned = planned_gib(s, "nf4", density)
    rows = ["| job | load s | salience s | selection s | training s | save s | whole job s | tokens/s | "
            "peak GiB: load / salience / training / save | planned (SPEFT): load / salience / training |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        if isinstance(r, str):
            rows.append(f"| {name} | {r} |" + " |" * 8)
            continue
        p = r["phase_s"]
        peaks = " / ".join(_peak(r, phase) for phase in ("load", "salience", "training", "eval and adapter"))
        plan_cell = (f"{planned['load']:.2f} / {planned['salience']:.2f} / {planned['training']:.2f}"
                     if name.startswith("SPEFT") else "")
        rows.append(f"| {name} | {p['load']:.1f} | {p['salience']:.1f} | {p['selection']:.1f} | {p['training']:.1f} | "
                    f"{p['save']:.1f} | {r['job_s']:.0f} | {tokens_per_s(r, s):,.0f} | {peaks} | {plan_cell} |")
    return rows


def bf16_rows(results: dict, s: dict, parameters: int, peak_tflops: float) -> list[str]:
    lora = results.get("LoRA")
    rows = ["| method | trainable | median step s | step / LoRA | tokens/s | peak training GiB | MFU | "
            "salience s | selection s |", "|---|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        if isinstance(r, str):
            rows.append(f"| {name} | {r} |" + " |" * 7)
            continue
        step = r["median_step_s"]
        ratio = f"{step / lora['median_step_s']:.2f}" if isinstance(lora, dict) else ""
        mfu = 6 * parameters * s["micro_batch"] * s["seq_len"] / step / (peak_tflops * 1e12)
        salience = "" if r.get("salience_s") is None else f"{r['salience_s']:.1f}"
        selection = "" if r.get("selection_s") is None else f"{r['selection_s']:.1f}"
        rows.append(f"| {name} | {r['trainable']:,} | {step:.3f} | {ratio} | {tokens_per_s(r, s):,.0f} | "
                    f"{_peak(r, 'training')} | {mfu:.1%} | {salience} | {selection} |")
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("part", nargs="?", choices=("nf4", "bf16", "all"), default="all",
                        help="One part per device run; all: both, one after the other (the dry run's default).")
    parser.add_argument("--dry_run", action="store_true", help="Tiny shapes on CPU: check every job runs.")
    parser.add_argument("--work_dir", default="/tmp/speft-gpu-scale")
    parser.add_argument("--doc", default=str(REPO / "docs" / "gpu_checks.md"))
    parser.add_argument("--out", default=os.environ.get("OUT", "/tmp/gpu_scale"))
    parser.add_argument("--time_limit_s", type=float, default=float("inf"),
                        help="Stop starting or running jobs past this, keeping 20 s to write what ran.")
    args = parser.parse_args()
    deadline = time.monotonic() + args.time_limit_s - 20
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_scale: no CUDA device visible to torch (use --dry_run on CPU)", file=sys.stderr)
        return 4
    parts = ("nf4", "bf16") if args.part == "all" else (args.part,)
    return max(run_part(part, args, deadline) for part in parts)


def run_part(part: str, args, deadline: float) -> int:
    """One part's jobs, its section (appended to the doc unless a dry run) and its logs under --out."""
    s = settings(part, args.dry_run)
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    work = Path(args.work_dir)
    model, data = work / ("tiny-random" if args.dry_run else "llama-7b-random"), work / "texts.jsonl"
    written = time.perf_counter()
    if not (model / "config.json").is_file():
        write_random_model(model, s["shape"], device=s["accelerator"])
    written = time.perf_counter() - written
    # texts of more than seq_len tokens each (the embedded tokenizer takes under 4 characters a token), enough
    # for the calibration rows and every step; packing cuts them into rows of exactly seq_len
    write_long_texts(data, n=s["calibration"] + s["steps"] * s["micro_batch"] + 8, chars=s["seq_len"] * 4)
    targeted, in_plus_out = target_sizes(model)
    density = s["lora_r"] * in_plus_out / targeted
    results = {name: run_job(name, method, flags, s, model, data, work, deadline - time.monotonic())
               for name, (method, flags) in s["methods"].items()}
    device = "CPU (dry run)" if args.dry_run else torch.cuda.get_device_name()
    parameters = ModelShape.from_config(s["shape"]).total
    lines = [f"## {started}: {device}, bench/gpu/gpu_scale.py {part}" + (" --dry_run" if args.dry_run else ""), "",
             f"{versions()}. Random-weight LLaMA ({s['shape']['hidden_size']} hidden, {s['shape']['num_hidden_layers']} "
             f"layers, {parameters:,} parameters, {targeted:,} targeted), written in {written:.0f} s; "
             f"{s['seq_len']} tokens x micro-batch {s['micro_batch']}, gradient checkpointing, ZeRO-3 on 1 device, "
             f"LoRA r = {s['lora_r']} ({s['lora_r'] * in_plus_out:,} trainable, SPEFT the same k: density "
             f"{density:.3%}), {s['calibration']} calibration examples, {s['steps'] - 1} timed steps after 1.", ""]
    if part == "nf4":
        cap = f"capped at {s['cap_gib']} GiB" if s["cap_gib"] else "no cap (dry run)"
        lines += [f"nf4 base, process {cap}, --max_memory_gib {MAX_MEMORY_GIB}.", "", *nf4_rows(results, s, density)]
    else:
        dtype, n = (torch.float32, 512) if args.dry_run else (torch.bfloat16, 8192)
        rate = matmul_tflops(s["accelerator"], dtype, n)
        lines += [f"{str(dtype).removeprefix('torch.')} matmul rate measured here: {rate:,.2f} TFLOP/s ({n}^3 "
                  f"products); MFU = 6 x {parameters:,} parameters x tokens / step time over it.", "",
                  *bf16_rows(results, s, parameters, rate)]
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.dry_run:
        with open(args.doc, "a") as doc:
            doc.write("\n" + text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"gpu_scale_{part}.md").write_text(text)
    for log in work.glob("*.log"):
        shutil.copy(log, out / log.name)
    return 0 if all(isinstance(r, dict) for r in results.values()) else 2


if __name__ == "__main__":
    sys.exit(main())
