"""SPEFT (dense and sparse delta), LoRA and full fine-tuning on one GPU, side by side: bench/speed/compare.py's jobs
(its data, micro-batch, steps and LoRA rank matched to SPEFT's k; ZeRO-3, world size 1, bf16, torch AdamW) on
a random-weight ~1.1B LLaMA (bench/common/random_llama.py's LLAMA_1B, no download). Prints and appends to
docs/gpu_checks.md a dated section: the device, the versions, the gpu tests' outcome (--tests, from
bench/gpu/gpu_check.sh), each method's median step time and peak GPU memory with their ratios to LoRA, and
SPEFT's salience pass time. A method whose job fails is reported as failed; the others are still written.

    python bench/gpu/gpu_bench.py [--tests "13 passed in 95.1s (exit 0)"]
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from bench.common.jobs import (CALIBRATION, MICRO_BATCH, SEQ_LEN, STEPS, WARMUP, Runs, lora_rank,  # noqa: E402
                               target_sizes)
from bench.common.random_llama import LLAMA_1B, write_long_texts, write_random_model  # noqa: E402

DENSITY = 0.01
BF16 = ("--bf16", "true")  # explicit: a GPU without bf16 fails rather than measuring fp32
# name -> (compare_worker method, extra training flags)
METHODS = {"SPEFT, dense delta": ("speft", "--delta_impl", "dense"),
           "SPEFT, sparse delta": ("speft", "--delta_impl", "sparse"),
           "LoRA": ("lora",), "full fine-tuning": ("full",)}
VERSIONS = ("torch", "deepspeed", "transformers", "peft", "bitsandbytes")


def versions() -> str:
    found = []
    for name in VERSIONS:
        try:
            found.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            found.append(f"{name} not installed")
    return ", ".join(found) + f", CUDA {torch.version.cuda}"


def table(results: dict[str, dict | str]) -> list[str]:
    """One row per method: its figures and their ratios to LoRA's (a failed job: its error)."""
    lora = results.get("LoRA")
    rows = ["| method | trainable | median step s | step / LoRA | peak GPU MiB | peak / LoRA | optimizer state MiB |",
            "|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        if isinstance(r, str):
            rows.append(f"| {name} | {r} | | | | | |")
            continue
        step, peak = r["median_step_s"], r["device_peak_mib_per_rank"][0]
        ratios = ([f"{step / lora['median_step_s']:.2f}", f"{peak / lora['device_peak_mib_per_rank'][0]:.2f}"]
                  if isinstance(lora, dict) else ["", ""])
        rows.append(f"| {name} | {r['trainable']:,} | {step:.3f} | {ratios[0]} | {peak:,.0f} | {ratios[1]} "
                    f"| {r['optimizer_bytes_per_rank'][0] / 2**20:,.1f} |")
    return rows


def section(results: dict[str, dict | str], tests: str, model_dir: Path, device: str, started: str) -> list[str]:
    """The doc's section for one run: what ran where, the table, the salience pass times."""
    model = json.loads((model_dir / "config.json").read_text())
    targeted, _ = target_sizes(model_dir)
    lines = [f"## {started}: {device}", "", f"`bash bench/gpu/gpu_check.sh`. {versions()}.", "",
             f"- gpu tests: {tests}",
             f"- benchmark (`bench/gpu/gpu_bench.py`): random-weight LLaMA, {model['hidden_size']} hidden, "
             f"{model['num_hidden_layers']} layers ({targeted:,} targeted elements, all decoder linears), bf16, "
             f"ZeRO-3 on 1 GPU, torch AdamW; micro-batch {MICRO_BATCH} x {SEQ_LEN} tokens, density {DENSITY} "
             f"(LoRA r = {lora_rank(model_dir, DENSITY)}), {WARMUP} warm-up step then the median of {STEPS}; "
             "peak GPU memory is torch's peak allocated during training.", "", *table(results), ""]
    for name in ("SPEFT, dense delta", "SPEFT, sparse delta"):
        r = results[name]
        if isinstance(r, dict):
            lines.append(f"- {name}: salience pass ({CALIBRATION} calibration examples) {r['salience_s']:.2f} s, "
                         f"selection {r['selection_s']:.2f} s.")
    return lines + [""]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tests", default="not run", help="the gpu tests' outcome, for the record")
    parser.add_argument("--work_dir", default="/tmp/speft-gpu-bench")
    parser.add_argument("--doc", default=str(REPO / "docs" / "gpu_checks.md"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("gpu_bench: no CUDA device visible to torch: nothing to measure", file=sys.stderr)
        return 4
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    work = Path(args.work_dir)
    model_dir, dataset = work / "llama-1b-random", work / "texts.jsonl"
    if not (model_dir / "config.json").is_file():
        write_random_model(model_dir, LLAMA_1B)
    write_long_texts(dataset, n=96)

    runs = Runs(dataset, work, accelerator="cuda")
    results: dict[str, dict | str] = {}
    for name, (method, *flags) in METHODS.items():
        try:
            results[name] = runs(method, model_dir, 1, DENSITY, *BF16, *flags)
        except subprocess.CalledProcessError as err:
            results[name] = f"failed (exit {err.returncode})"

    lines = section(results, args.tests, model_dir, torch.cuda.get_device_name(), started)
    with open(args.doc, "a") as doc:
        doc.write("\n" + "\n".join(lines))
    print("\n".join(lines))
    return 0 if all(isinstance(r, dict) for r in results.values()) else 2


if __name__ == "__main__":
    sys.exit(main())
