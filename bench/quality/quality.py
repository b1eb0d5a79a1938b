"""Quality on a pretrained model, SmolLM2-135M-Instruct on 2 CPU ranks: salience masks against a random mask of
the same size and LoRA at the same trainable count, from far below LoRA's floor to about 1% of the targeted
weights, on three tasks; held-out accuracy (paired verdicts over stored per-question results), held-out loss
and forgetting of a general English text.

    python bench/quality/quality.py --run_next 3     # the next 3 jobs of the plan (cells and test scorings), appended
    python bench/quality/quality.py --table          # docs/quality.md from bench/results/quality.jsonl
    python bench/quality/quality.py --cell snr --budget 0.86% --lr 1e-2 --seed 1   # one cell by hand (validation only)

The files read one way: this command -> runner.py (runs a job) and report.py (writes the page, with stats.py)
-> plan.py (what to run, what was chosen) -> records.py (the results file) and quality_tasks.py (the tasks).
The protocol and its rules are docs/quality.md's; every cell's time is its whole job's on a machine that may
have been shared (the cost comparison is bench/speed/whole_job.py's, on an idle one).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.quality.plan import BUDGETS, METHODS, MAIN_BUDGET, SWEEP_TASK, planned  # noqa: E402
from bench.quality.records import STEPS, Cell, read_results  # noqa: E402


def remaining() -> list:
    cells, _, tests = read_results()
    return planned(cells, tests)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run_next", type=int, default=0, metavar="N", help="Run the next N planned jobs.")
    parser.add_argument("--cell", choices=METHODS, help="Run one cell by hand: with --budget, --lr and --seed.")
    parser.add_argument("--task", choices=("arith", "choose", "cities"), default=SWEEP_TASK)
    parser.add_argument("--budget", choices=BUDGETS, default=MAIN_BUDGET)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--weight_decay", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--table", action="store_true", help="Write docs/quality.md.")
    args = parser.parse_args()
    if args.cell or args.run_next:
        from bench.quality.runner import run_cell, run_test

        if args.cell:
            run_cell(Cell(args.cell, args.task, args.budget, args.lr, args.seed, args.steps, args.weight_decay))
        for _ in range(args.run_next):
            jobs = remaining()
            if not jobs:
                break
            kind, cell = jobs[0]
            (run_cell if kind == "cell" else run_test)(cell)
    jobs = remaining()
    print(f"{len(jobs)} planned jobs remain" + (f"; next: {jobs[0][0]} {jobs[0][1].tag}" if jobs else ""))
    if args.table:
        from bench.quality.report import write_page

        write_page()
    return 0


if __name__ == "__main__":
    sys.exit(main())
