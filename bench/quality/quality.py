"""Quality on a pretrained model, SmolLM2-135M-Instruct on 2 CPU ranks: SPEFT (gradient salience, global
top-k) against a random mask of the same size and LoRA at the same trainable count, from far below LoRA's
floor (r = 1 on every targeted linear; below it LoRA at r = 1 on fewer modules) to about 1% of the targeted
weights; held-out accuracy with its standard error, held-out loss, forgetting of a general English text,
and the whole job's cost.

    python bench/quality/quality.py --run_next 3     # the next 3 jobs of the plan (cells and test scorings), appended
    python bench/quality/quality.py --table          # docs/quality.md and docs/quality.png from bench/results/quality.jsonl
    python bench/quality/quality.py --cell lora --budget 0.86% --lr 3e-3 --seed 1   # one cell by hand (validation only)

The protocol. Each task (bench/quality/quality_tasks.py) has a training file, a validation task carved from the
training side of the split and a test task, disjoint by question with commutative operands unordered. A
cell trains one method at one budget, rate and seed for STEPS optimizer steps and scores the validation
task, the held-out loss of a --val_size carve of the training file (less repeated prompts) and the
retention text (RETENTION: loss, and KL(base || tuned) where the method can switch its update off). A
method's rate at a budget is chosen on seed 1's validation accuracy (ties: lower held-out loss) once the
best rate of its grid is interior: a best at an edge extends the grid by the next rate on LADDER. The
chosen setting then runs with seed 2, and each chosen cell's adapter scores the test task once (a test
job); that score is the reported figure. The second task and the long cells reuse the rates chosen on the
sweep task's validation. Every record carries the commit it ran on and the load average around it (the
cells' times are the whole job's, on a machine that may have been shared).

The retention text is /usr/share/common-licenses/GPL-3 from Debian's base-files package, present on every
Debian system (the GNU GPL v3: "Everyone is permitted to copy and distribute verbatim copies of this
license document"): general English legal prose that no task resembles.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from bench.common.jobs import target_sizes  # noqa: E402
from bench.quality.quality_tasks import write_task  # noqa: E402
from speft_ds.config import DEFAULT_LEARNING_RATES, DEFAULT_MODEL  # noqa: E402
from speft_ds.runtime.distributed import free_port  # noqa: E402

RESULTS = Path(os.environ.get("SPEFT_QUALITY_RESULTS", REPO / "bench" / "results" / "quality.jsonl"))
WORK = Path(os.environ.get("SPEFT_QUALITY_WORK", "/tmp/speft-quality"))
RETENTION = Path("/usr/share/common-licenses/GPL-3")
WORLD_SIZE, STEPS, LONG_STEPS, MICRO_BATCH, SEQ_LEN, CALIBRATION = 2, 60, 300, 8, 96, 128
LADDER = (1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0, 3.0)  # half decades
# method -> (compare_worker method, extra training flags)
METHODS = {"base": ("base", []), "speft": ("speft", []), "random": ("speft", ["--metric", "random"]),
           "lora": ("lora", []),
           # the forgetting remedies: each gradient score over its input channel's activation norm; at most
           # twice a column's even share of k on any input channel (fixed in advance, not tuned)
           "channel": ("speft", ["--metric", "gradient_over_input"]),
           "cap": ("speft", ["--input_channel_cap", "2"])}


@dataclass(frozen=True)
class Budget:
    """A trainable count: LoRA's at rank `lora_r` on every targeted linear (SPEFT and the random mask then
    train exactly as many entries), or, below LoRA's floor, a fraction `density` of the targeted weights,
    which LoRA reaches only at r = 1 on fewer modules (`lora_targets`, its --target_modules)."""
    lora_r: int | None = None
    density: float | None = None
    lora_targets: str | None = None


# r = 1 on v_proj (576 -> 192) of every other layer up to 26: 14 x 768 = 10,752, 1.3% over 0.01% of the
# targeted weights (10,617)
V_PROJ_EVERY_OTHER = r"model\.layers\.(" + "|".join(str(i) for i in range(0, 28, 2)) + r")\.self_attn\.v_proj"
BUDGETS = {"0%": Budget(), "0.01%": Budget(lora_r=1, density=1e-4, lora_targets=V_PROJ_EVERY_OTHER),
           "0.29%": Budget(lora_r=1), "0.86%": Budget(lora_r=3)}
# (method, budget) -> the first grid; sparser updates need larger rates (a random mask most)
START = {("speft", "0.86%"): (3e-4, 1e-3, 3e-3), ("random", "0.86%"): (1e-3, 3e-3, 1e-2),
         ("lora", "0.86%"): (1e-3, 3e-3, 1e-2), ("channel", "0.86%"): (3e-4, 1e-3, 3e-3),
         ("speft", "0.01%"): (3e-3, 1e-2, 3e-2), ("random", "0.01%"): (1e-2, 3e-2, 1e-1),
         ("speft", "0.29%"): (1e-3, 3e-3, 1e-2), ("random", "0.29%"): (3e-3, 1e-2, 3e-2),
         ("lora", "0.29%"): (1e-3, 3e-3, 1e-2), ("lora", "0.01%"): (3e-3, 1e-2, 3e-2)}
# Sweeps added after the plan above was running (the cap per input channel, once built): each runs last,
# its seed-1 test scoring after it, with no second seed, other task or long cell.
LATE = {("cap", "0.86%"): (1e-3, 3e-3, 1e-2)}
SWEEPS = {**START, **LATE}
SWEEP_TASK, OTHER_TASK, SEEDS, MAIN_BUDGET = "arith", "choose", (1, 2), "0.86%"
# the base model as loaded: every cell's accuracy gain and retention loss rise are counted from it
BASE_CELLS = tuple(("base", task) for task in (SWEEP_TASK, OTHER_TASK))


@dataclass(frozen=True)
class Cell:
    method: str
    task: str
    budget: str
    lr: float
    seed: int
    steps: int = STEPS

    @property
    def tag(self) -> str:
        return f"{self.method}-{self.task}-b{self.budget}-lr{self.lr:g}-s{self.seed}-n{self.steps}"


def cell_of(record: dict) -> Cell:
    return Cell(record["method"], record["task"], record["budget"], record["lr"], record["seed"], record["steps"])


def base_cell(task: str) -> Cell:
    return Cell("base", task, "0%", 0.0, 1, 0)


def trainable(budget: Budget, model: str) -> int:
    targeted, in_plus_out = target_sizes(Path(model))
    return round(budget.density * targeted) if budget.density else budget.lora_r * in_plus_out


def _commit() -> dict:
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    changed = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                             capture_output=True, text=True).stdout.strip()
    return {"commit": head, "tree_changed": bool(changed)}


def read_records(path: Path) -> list[dict]:
    """A .jsonl results file's records (none where it does not exist yet)."""
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def append_record(record: dict, path: Path = RESULTS) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as fh:
        fh.write(json.dumps(record) + "\n")


def _deepspeed(script: str, *args: str) -> subprocess.CompletedProcess:
    command = ["deepspeed", "--num_gpus", str(WORLD_SIZE), "--master_port", str(free_port()), script, *args]
    print(" ".join(command), flush=True)
    return subprocess.run(command, cwd=REPO, env={**os.environ, "DS_ACCELERATOR": "cpu"}, capture_output=True,
                          text=True)


def run_cell(cell: Cell) -> dict:
    """Train one cell on the validation task; append its record (a failed run as one too: a diverged rate
    is a result of the sweep)."""
    from speft_ds.models.gguf import resolve_model

    model = resolve_model(DEFAULT_MODEL)
    files = write_task(cell.task, WORK / "tasks")
    budget = BUDGETS[cell.budget]
    worker, extra = METHODS[cell.method]
    size = ["--lora_r", str(budget.lora_r)] if worker == "lora" else []
    size += ["--target_modules", budget.lora_targets] if worker == "lora" and budget.lora_targets else []
    size_flags = ["--num_trainable", str(trainable(budget, model))] if worker == "speft" else []
    result = WORK / f"{cell.tag}.json"
    result.unlink(missing_ok=True)
    started, load = time.time(), os.getloadavg()[0]
    proc = _deepspeed(
        "bench/common/compare_worker.py", "--method", worker, *size, "--result", str(result),
        "--warmup_steps_excluded", "1",
        "--", "--model", model, "--dataset", str(files.train), "--eval_task", str(files.validation),
        "--retention_text", str(RETENTION), "--seq_len", str(SEQ_LEN), "--micro_batch_size", str(MICRO_BATCH),
        "--max_steps", str(max(cell.steps, 1)), "--warmup_steps", str(cell.steps // 10),
        "--learning_rate", str(cell.lr or 1e-3), "--seed", str(cell.seed), "--calibration_examples", str(CALIBRATION),
        "--val_size", "0.05", "--logging_steps", "10", "--output_dir", str(WORK / cell.tag), "--overwrite_output_dir",
        # the base is scored once, in its own cell: every other cell starts from it
        "--eval_on_start", "false", *size_flags, *extra)
    record = {**asdict(cell), **_commit(), "load_avg_1m": [load, os.getloadavg()[0]],
              "job_s": time.time() - started}
    if proc.returncode == 0:
        record.update(json.loads(result.read_text()), method=cell.method)  # the worker's "method" is its kind
    else:
        record.update(failed=(proc.stdout + proc.stderr).strip().splitlines()[-3:])
    append_record(record)
    return record


def run_test(cell: Cell) -> dict:
    """Score a chosen cell's adapter (the base: the model as loaded) on its task's test split, once; the
    cell is trained again where this machine no longer has its adapter."""
    adapter = WORK / cell.tag / "adapter"
    if cell.method != "base" and not adapter.is_dir():
        if "failed" in run_cell(cell):
            record = {"test_of": asdict(cell), **_commit(), "failed": True, "accuracy": 0.0, "stderr": 0.0}
            append_record(record)
            return record
    from speft_ds.models.gguf import resolve_model

    files = write_task(cell.task, WORK / "tasks")
    output = WORK / f"{cell.tag}-test.json"
    proc = _deepspeed("launch/evaluate.py", "--model", resolve_model(DEFAULT_MODEL), "--task", str(files.test),
                      "--output", str(output), *([] if cell.method == "base" else ["--adapter", str(adapter)]))
    if proc.returncode != 0:
        raise RuntimeError(f"scoring {cell.tag} on the test split failed:\n{proc.stderr[-2000:]}")
    scored = json.loads(output.read_text())
    record = {"test_of": asdict(cell), **_commit(), "accuracy": scored["accuracy"], "stderr": scored["stderr"],
              "examples": scored["examples"]}
    append_record(record)
    return record


def read_results() -> tuple[dict[Cell, dict], dict[Cell, dict]]:
    """(cell -> its latest record, cell -> its test score)."""
    cells, tests = {}, {}
    for record in read_records(RESULTS):
        if "test_of" in record:
            tests[Cell(**record["test_of"])] = record
        else:
            cells[cell_of(record)] = record
    return cells, tests


def validation_score(record: dict) -> tuple[float, float]:
    """What a rate is chosen by: validation accuracy, then the lower held-out loss; a failed run is last."""
    if "failed" in record:
        return float("-inf"), float("-inf")
    return record["task_after"]["accuracy"], -record["eval_loss"]


def sweep(cells: dict, method: str, budget: str) -> tuple[list[float], float | None]:
    """(the rates the seed-1 sweep needs, the chosen rate once the best of them is interior)."""
    grid = sorted(SWEEPS[(method, budget)])
    while True:
        done = [cells.get(Cell(method, SWEEP_TASK, budget, lr, 1)) for lr in grid]
        if any(r is None for r in done):
            return grid, None
        best = max(range(len(grid)), key=lambda i: validation_score(done[i]))
        at = LADDER.index(grid[best])
        if best == 0 and at > 0:
            grid.insert(0, LADDER[at - 1])
        elif best == len(grid) - 1 and at < len(LADDER) - 1:
            grid.append(LADDER[at + 1])
        else:
            return grid, grid[best]


def at_chosen_rates(cells: dict, budget: str) -> list[Cell]:
    """The cells at a budget whose test score is reported, once its sweeps have chosen their rates: both
    seeds on the sweep task, and at the main budget the other task."""
    chosen = []
    for method, at in START:
        lr = sweep(cells, method, budget)[1] if at == budget else None
        if lr is not None:
            chosen += [Cell(method, SWEEP_TASK, budget, lr, seed) for seed in SEEDS]
            chosen += [Cell(method, OTHER_TASK, budget, lr, 1)] if budget == MAIN_BUDGET else []
    return chosen


def long_cells(cells: dict) -> list[Cell]:
    """One long cell per method at the main budget and its chosen rate: do the gaps change with length?"""
    return [Cell(method, SWEEP_TASK, MAIN_BUDGET, lr, 1, LONG_STEPS) for method, budget in START
            if budget == MAIN_BUDGET and (lr := sweep(cells, method, budget)[1]) is not None]


def default_checks(cells: dict) -> list[Cell]:
    """A default rate moves only where validation on both tasks favours the new one: where a method's rate
    chosen at the main budget is not its default, the other task runs at the default too (validation only)."""
    return [Cell(method, OTHER_TASK, MAIN_BUDGET, default, 1) for method, default in DEFAULT_LEARNING_RATES.items()
            if (method, MAIN_BUDGET) in START and sweep(cells, method, MAIN_BUDGET)[1] not in (None, default)]


def planned(cells: dict, tests: dict) -> list[tuple[str, Cell]]:
    """The jobs not yet run, in order: the base; then budget by budget (the main one first) every method's
    sweep and the test scoring of its chosen rate's seed-1 cell, so the curve over budgets fills first; then
    the second seeds and, at the main budget, the other task (and its default-rate checks); then the long
    cells; then the late sweeps, each with its seed-1 test. Each reported cell is followed by its test scoring."""
    def first(cell: Cell) -> bool:
        return cell.seed == SEEDS[0] and cell.task == SWEEP_TASK

    reported = [base_cell(task) for _, task in BASE_CELLS]
    jobs = [(kind, cell) for cell in reported for kind in ("cell", "test")]
    budgets = list(dict.fromkeys(budget for _, budget in START))
    for budget in budgets:
        jobs += [("cell", Cell(method, SWEEP_TASK, budget, lr, 1)) for method, at in START if at == budget
                 for lr in sweep(cells, method, budget)[0]]
        jobs += [("test", cell) for cell in at_chosen_rates(cells, budget) if first(cell)]
    for budget in budgets:
        jobs += [(kind, cell) for cell in at_chosen_rates(cells, budget) if not first(cell)
                 for kind in ("cell", "test")]
    jobs += [("cell", cell) for cell in default_checks(cells)]
    jobs += [(kind, cell) for cell in long_cells(cells) for kind in ("cell", "test")]
    for method, budget in LATE:
        grid, chosen = sweep(cells, method, budget)
        jobs += [("cell", Cell(method, SWEEP_TASK, budget, lr, 1)) for lr in grid]
        jobs += [("test", Cell(method, SWEEP_TASK, budget, chosen, 1))] if chosen is not None else []
    return [(kind, cell) for kind, cell in jobs
            if (kind == "cell" and cell not in cells) or (kind == "test" and cell not in tests)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run_next", type=int, default=0, metavar="N", help="Run the next N planned jobs.")
    parser.add_argument("--cell", choices=METHODS, help="Run one cell by hand: with --budget, --lr and --seed.")
    parser.add_argument("--task", choices=("arith", "choose"), default=SWEEP_TASK)
    parser.add_argument("--budget", choices=BUDGETS, default=MAIN_BUDGET)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--table", action="store_true", help="Write docs/quality.md and docs/quality.png.")
    args = parser.parse_args()
    if args.cell:
        run_cell(Cell(args.cell, args.task, args.budget, args.lr, args.seed, args.steps))
    for _ in range(args.run_next):
        jobs = planned(*read_results())
        if not jobs:
            break
        kind, cell = jobs[0]
        (run_cell if kind == "cell" else run_test)(cell)
    jobs = planned(*read_results())
    print(f"{len(jobs)} planned jobs remain" + (f"; next: {jobs[0][0]} {jobs[0][1].tag}" if jobs else ""))
    if args.table:
        from bench.quality.quality_report import write_page

        write_page(remaining=len(jobs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
