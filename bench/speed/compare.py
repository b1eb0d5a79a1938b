"""SPEFT next to LoRA, full fine-tuning and the paper code's approach: same model, ZeRO-3 config, world
size, data and steps, and (for LoRA) the trainable count closest to SPEFT's k on the same target modules.

    pip install -e ".[bench]"
    python bench/speed/compare.py [--model DIR] [--world_size 2] [--density 0.01] [--sweeps]

By default the model is a random-weight ~124M LLaMA (hidden 768, 12 layers, 12 heads, 4 KV heads,
intermediate 2048, vocab 32000), micro-batch 4 x 256 tokens, all decoder linears targeted, torch AdamW
(ds_configs/z3.json), 64 calibration examples, 1 warm-up step then the median of 4. Per method it reports
the median step time, peak RSS per rank during training, trainable and optimizer-state bytes per rank,
the eval loss, and SPEFT's salience and selection times; then the ratios SPEFT / LoRA, SPEFT / full and
SPEFT / paper approach, and every method's step over the floor's (the same model frozen, forward and a
backward to the input embeddings, nothing trained). `--sweeps` adds densities 0.1%, 1%, 5% (SPEFT and LoRA), world sizes 1 and 2,
and depths 2, 6, 12 layers. Writes docs/benchmarks.md and docs/benchmarks.png.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from bench.common.jobs import (CALIBRATION, MICRO_BATCH, SEQ_LEN, STEPS, WARMUP, Runs, lora_rank,  # noqa: E402
                               target_sizes)
from bench.common.random_llama import LLAMA_124M, write_long_texts, write_random_model  # noqa: E402

METHODS = ("speft", "lora", "full", "paper", "floor")


def _mib(values: list[float]) -> str:
    return f"{max(values):,.0f}"


def _bytes(values: list[int]) -> str:
    return f"{max(values) / 2**20:,.2f} MiB"


def main_table(results: dict[str, dict]) -> list[str]:
    rows = ["| method | trainable | median step s | peak RSS MiB / rank | trainable / rank | optimizer state / rank "
            "| eval loss |", "|---|---|---|---|---|---|---|"]
    for method, r in results.items():
        rows.append(f"| {method} | {r['trainable']:,} | {r['median_step_s']:.2f} | {_mib(r['peak_rss_mib_per_rank'])} "
                    f"| {_bytes(r['trainable_bytes_per_rank'])} | {_bytes(r['optimizer_bytes_per_rank'])} "
                    f"| {r['eval_loss']:.4f} |")
    speft = results["speft"]
    rows += ["", "| SPEFT / | step time | peak RSS |", "|---|---|---|"]
    for method in METHODS[1:-1]:
        other = results[method]
        rows.append(f"| {method} | {speft['median_step_s'] / other['median_step_s']:.2f} | "
                    f"{max(speft['peak_rss_mib_per_rank']) / max(other['peak_rss_mib_per_rank']):.2f} |")
    floor = results["floor"]["median_step_s"]
    rows += ["", "The floor: the same model frozen, its forward and a backward to the input embeddings per "
             "micro-batch, nothing trained, no optimizer (an engine with the salience pass's ZeRO-3 settings, so its "
             "peak RSS is not a floor for the others'). Each method's step over it:", "",
             "| method | step / floor |", "|---|---|"]
    rows += [f"| {method} | {results[method]['median_step_s'] / floor:.2f} |" for method in METHODS[:-1]]
    rows += ["", f"SPEFT salience pass ({CALIBRATION} examples): {speft['salience_s']:.1f} s; selection: "
             f"{speft['selection_s']:.2f} s ({100 * speft['selection_s'] / speft['salience_s']:.1f}% of salience)."]
    return rows


def chart(results: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(results)
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for ax, key, label in ((axes[0], "median_step_s", "median step time (s)"),
                           (axes[1], "peak_rss_mib_per_rank", "peak RSS per rank (MiB)")):
        values = [max(results[m][key]) if isinstance(results[m][key], list) else results[m][key] for m in methods]
        ax.bar(methods, values, color=["tab:green", "tab:blue", "tab:gray", "tab:orange", "tab:red"][:len(methods)])
        ax.set_title(label)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def sweeps(runs: Runs, model_dir: Path, density: float, world_size: int) -> list[str]:
    rows = ["## Density sweep (SPEFT vs LoRA at the nearest rank >= 1)", "",
            "| density | SPEFT k | LoRA r | LoRA trainable | SPEFT step s | LoRA step s | SPEFT / LoRA step "
            "| SPEFT / LoRA peak RSS |", "|---|---|---|---|---|---|---|---|"]
    for d in (0.001, 0.01, 0.05):
        s, lo = (runs(m, model_dir, world_size, d) for m in ("speft", "lora"))
        rows.append(f"| {d:.3f} | {s['trainable']:,} | {lora_rank(model_dir, d)} | {lo['trainable']:,} "
                    f"| {s['median_step_s']:.2f} | {lo['median_step_s']:.2f} | {s['median_step_s'] / lo['median_step_s']:.2f} "
                    f"| {max(s['peak_rss_mib_per_rank']) / max(lo['peak_rss_mib_per_rank']):.2f} |")
    rows += ["", f"## World size (density {density})", "",
             "| ranks | SPEFT step s | LoRA step s | SPEFT / LoRA step | SPEFT peak MiB | LoRA peak MiB |",
             "|---|---|---|---|---|---|"]
    for n in (1, 2):
        s, lo = (runs(m, model_dir, n, density) for m in ("speft", "lora"))
        rows.append(f"| {n} | {s['median_step_s']:.2f} | {lo['median_step_s']:.2f} "
                    f"| {s['median_step_s'] / lo['median_step_s']:.2f} | {_mib(s['peak_rss_mib_per_rank'])} "
                    f"| {_mib(lo['peak_rss_mib_per_rank'])} |")
    rows += ["", f"## Depth (density {density}, {world_size} ranks): peak RSS per rank", "",
             "| layers | SPEFT peak MiB | LoRA peak MiB |", "|---|---|---|"]
    peaks = {}
    config = json.loads((model_dir / "config.json").read_text())
    for layers in (2, 6, config["num_hidden_layers"]):
        depth_dir = model_dir
        if layers != config["num_hidden_layers"]:
            depth_dir = runs.work / f"{model_dir.name}-{layers}-layers"
            if not (depth_dir / "config.json").is_file():
                write_random_model(depth_dir, {**{key: config[key] for key in LLAMA_124M}, "num_hidden_layers": layers})
        peaks[layers] = {m: max(runs(m, depth_dir, world_size, density)["peak_rss_mib_per_rank"])
                         for m in ("speft", "lora")}
        rows.append(f"| {layers} | {peaks[layers]['speft']:,.0f} | {peaks[layers]['lora']:,.0f} |")
    deepest = max(peaks)
    growth = {m: (peaks[deepest][m] - peaks[2][m]) / (deepest - 2) for m in ("speft", "lora")}
    rows += ["", f"Peak RSS growth per layer (2 to {deepest} layers): SPEFT {growth['speft']:.1f} MiB, "
             f"LoRA {growth['lora']:.1f} MiB."]
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a local LLaMA directory (default: a random ~124M LLaMA)")
    parser.add_argument("--world_size", type=int, default=2)
    parser.add_argument("--density", type=float, default=0.01)
    parser.add_argument("--sweeps", action="store_true", help="also densities, world sizes 1-2, depths 2/6/12")
    parser.add_argument("--work_dir", default="/tmp/speft-compare")
    parser.add_argument("--docs", default=str(REPO / "docs"))
    args = parser.parse_args()
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    model_dir = Path(args.model) if args.model else work / "llama-124m-random"
    if not (model_dir / "config.json").is_file():
        write_random_model(model_dir, LLAMA_124M)
    dataset = work / "texts.jsonl"
    write_long_texts(dataset, n=96)

    runs = Runs(dataset, work)
    results = {m: runs(m, model_dir, args.world_size, args.density) for m in METHODS}
    targeted, in_plus_out = target_sizes(model_dir)
    r = lora_rank(model_dir, args.density)
    command = "python bench/speed/compare.py" + (" --sweeps" if args.sweeps else "")
    lines = ["# SPEFT vs LoRA vs full fine-tuning vs the paper code's approach", "",
             f"`{command}` on {platform.node()}: {os.cpu_count()} CPU cores, no GPU, {args.world_size} ranks, "
             f"ZeRO-3 on gloo, fp32, torch AdamW. Model: {model_dir.name} ({targeted:,} targeted elements, all "
             f"decoder linears), micro-batch {MICRO_BATCH} x {SEQ_LEN} tokens, density {args.density} "
             f"(LoRA r = {r}, {r * in_plus_out:,} trainable), lr 1e-3, {WARMUP} warm-up step then the median of {STEPS}.",
             "", *main_table(results), "", "![step time and peak RSS per method](benchmarks.png)", ""]
    if args.sweeps:
        lines += sweeps(runs, model_dir, args.density, args.world_size)
    docs = Path(args.docs)
    (docs / "benchmarks.md").write_text("\n".join(lines) + "\n")
    chart(results, docs / "benchmarks.png")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
