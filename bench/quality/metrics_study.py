"""The paper's study on this project's stack: every salience metric and mask strategy at an equal budget.

    python bench/quality/metrics_study.py [--model DIR --dataset FILE] [--world_size 2] [--max_steps N]

Runs 12 trainings with the DeepSpeed launcher (2 ranks, ZeRO-3): the nine metrics static with global
selection, plus gradient with local selection, with reselect and with drop/regrow. Each uses 64
calibration examples, the same steps and the same density. Writes docs/metrics_study.md: eval loss,
salience-pass wall time, mask overlap (Jaccard) between the static global masks, and whether the
paper's ordering (gradient among the best; magnitude and random behind) holds on this data.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from speft_ds.runtime.distributed import free_port

REPO = Path(__file__).resolve().parents[2]
STATIC_METRICS = ["random", "magnitude", "gradient", "snip", "force", "taylor", "fisher", "synflow", "grasp"]


def configurations(mask_update_steps: int) -> dict[str, list[str]]:
    runs = {f"{metric}": ["--metric", metric] for metric in STATIC_METRICS}
    runs["gradient-local"] = ["--metric", "gradient", "--selection", "local"]
    runs["gradient-reselect"] = ["--metric", "gradient", "--mask_update_steps", str(mask_update_steps),
                                 "--mask_update", "reselect"]
    runs["gradient-drop_regrow"] = ["--metric", "gradient", "--mask_update_steps", str(mask_update_steps),
                                    "--mask_update", "drop_regrow"]
    return runs


def train(name: str, flags: list[str], args, out_dir: Path) -> dict:
    cmd = ["deepspeed", "--num_gpus", str(args.world_size), "--master_port", str(free_port()), "launch/train.py",
           "--output_dir", str(out_dir / name), "--overwrite_output_dir", "--calibration_examples",
           str(args.calibration_examples), "--density", str(args.density), "--max_steps", str(args.max_steps),
           *(["--model", args.model] if args.model else []), *(["--dataset", args.dataset] if args.dataset else []),
           *flags]
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env={**os.environ})
    if proc.returncode != 0:
        sys.exit(f"run {name} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    records = [json.loads(line) for line in (out_dir / name / "metrics.jsonl").read_text().splitlines()]
    salience = [r["wall_time_s"] for r in records if r.get("event") == "salience"]
    adapter = load_file(str(out_dir / name / "adapter" / "adapter_model.safetensors"))
    return {"eval_loss": next(r["eval_loss"] for r in records if r.get("event") == "eval"),
            "salience_s": salience[0], "run_s": time.perf_counter() - started,
            "mask": {key[: -len(".indices")]: t for key, t in adapter.items() if key.endswith(".indices")}}


def jaccard(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    inter = union = 0
    for name in set(a) | set(b):
        x = set(a.get(name, torch.zeros(0)).tolist())
        y = set(b.get(name, torch.zeros(0)).tolist())
        inter, union = inter + len(x & y), union + len(x | y)
    return inter / union if union else 1.0


def verdict(results: dict) -> str:
    ranked = sorted(STATIC_METRICS, key=lambda m: results[m]["eval_loss"])
    place = ranked.index("gradient") + 1
    behind = [m for m in ("magnitude", "random") if results[m]["eval_loss"] > results["gradient"]["eval_loss"]]
    among_best = place <= 3
    holds = among_best and len(behind) == 2
    return (f"Static global masks ranked by eval loss: {', '.join(ranked)}. Gradient places {place} of "
            f"{len(ranked)}; {' and '.join(behind) or 'neither magnitude nor random'} "
            f"{'is' if len(behind) == 1 else 'are'} behind it. The paper's ordering (gradient among the best, "
            f"magnitude and random behind) {'holds' if holds else 'does not hold'} on this data.")


def write_report(results: dict, args, doc: Path, command: str) -> str:
    lines = ["# Salience metrics and mask strategies: the study", "",
             f"Command: `{command}`", "",
             f"Setup: {args.world_size} ranks, ZeRO-3 on the CPU accelerator (gloo), model "
             f"`{args.model or 'embedded tiny LLaMA'}`, dataset `{args.dataset or 'embedded arithmetic'}`, "
             f"density {args.density}, {args.calibration_examples} calibration examples, {args.max_steps} steps "
             f"each, same seed and data order. Machine: {os.cpu_count()} CPU cores.", "",
             "| configuration | eval loss | salience pass (s) | whole run (s) |", "|---|---|---|---|"]
    lines += [f"| {name} | {r['eval_loss']:.4f} | {r['salience_s']:.1f} | {r['run_s']:.0f} |"
              for name, r in results.items()]
    lines += ["", "Mask overlap (Jaccard) between the static global masks:", "",
              "| | " + " | ".join(STATIC_METRICS) + " |", "|---" * (len(STATIC_METRICS) + 1) + "|"]
    for a in STATIC_METRICS:
        lines.append(f"| {a} | " + " | ".join(f"{jaccard(results[a]['mask'], results[b]['mask']):.2f}"
                                               for b in STATIC_METRICS) + " |")
    lines += ["", verdict(results), ""]
    text = "\n".join(lines)
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(text)
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="HF model directory (default: the embedded tiny LLaMA).")
    parser.add_argument("--dataset", help="Dataset file (default: the embedded arithmetic problems).")
    parser.add_argument("--world_size", type=int, default=2)
    parser.add_argument("--density", type=float, default=0.01)
    parser.add_argument("--calibration_examples", type=int, default=64)
    parser.add_argument("--max_steps", type=int, default=200)
    parser.add_argument("--mask_update_steps", type=int, default=50, help="For the two dynamic runs.")
    parser.add_argument("--out_dir", default="outputs/metrics_study")
    parser.add_argument("--doc", default="docs/metrics_study.md")
    args = parser.parse_args()
    results = {}
    for name, flags in configurations(args.mask_update_steps).items():
        results[name] = train(name, flags, args, REPO / args.out_dir)
        print(f"{name}: eval loss {results[name]['eval_loss']:.4f}, salience {results[name]['salience_s']:.1f} s",
              flush=True)
    print(write_report(results, args, REPO / args.doc, "python " + " ".join(sys.argv)))


if __name__ == "__main__":
    main()
