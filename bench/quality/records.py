"""The quality benchmark's records: what a cell is, where its results live, and how they are read back.

bench/results/quality.jsonl holds one record per job: a cell (one method trained at one budget, rate, weight
decay, seed and length, scored on its task's validation split) or a test scoring of a cell (`test_of`). A test
scoring of the third protocol also writes each question's result beside it, in QUESTIONS/<tag>.jsonl, so that
verdicts can pair the methods question by question. Every record carries the commit it ran on.
"""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
RESULTS = Path(os.environ.get("SPEFT_QUALITY_RESULTS", REPO / "bench" / "results" / "quality.jsonl"))
QUESTIONS = RESULTS.parent / "quality_questions"
WORK = Path(os.environ.get("SPEFT_QUALITY_WORK", "/tmp/speft-quality"))
STEPS = 60
# The third protocol's test split has 500 questions; the second's test scorings (200) stay in the file.
TEST_QUESTIONS = 500


@dataclass(frozen=True)
class Cell:
    method: str
    task: str
    budget: str
    lr: float
    seed: int
    steps: int = STEPS
    weight_decay: float = 0.0

    @property
    def tag(self) -> str:
        decay = f"-wd{self.weight_decay:g}" if self.weight_decay else ""
        return f"{self.method}-{self.task}-b{self.budget}-lr{self.lr:g}{decay}-s{self.seed}-n{self.steps}"


def cell_of(record: dict) -> Cell:
    return Cell(record["method"], record["task"], record["budget"], record["lr"], record["seed"], record["steps"],
                record.get("weight_decay", 0.0))


def test_cell(record: dict) -> Cell:
    return Cell(**{"weight_decay": 0.0, **record["test_of"]})


def base_cell(task: str) -> Cell:
    return Cell("base", task, "0%", 0.0, 1, 0)


def read_records(path: Path) -> list[dict]:
    """A .jsonl results file's records (none where it does not exist yet)."""
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def append_record(record: dict, path: Path = RESULTS) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as fh:
        fh.write(json.dumps(record) + "\n")


def read_results() -> tuple[dict[Cell, dict], dict[Cell, dict], dict[Cell, dict]]:
    """(cell -> its latest record, cell -> its test score on the 200-question split of the second protocol,
    cell -> its test score on the 500-question split of the third)."""
    cells, tests, tests500 = {}, {}, {}
    for record in read_records(RESULTS):
        if "test_of" not in record:
            cells[cell_of(record)] = record
        elif record.get("examples") == TEST_QUESTIONS or (record.get("failed") and record.get("protocol") == 3):
            tests500[test_cell(record)] = record
        else:
            tests[test_cell(record)] = record
    return cells, tests, tests500


def questions_file(cell: Cell) -> Path:
    """Where a third-protocol test scoring keeps each question's result."""
    return QUESTIONS / f"{cell.tag}.jsonl"


def read_questions(cell: Cell) -> list[bool]:
    """Each test question's correctness for a scored cell, in the task file's order."""
    return [json.loads(line)["correct"] for line in questions_file(cell).read_text().splitlines()]


def commit() -> dict:
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    changed = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                             capture_output=True, text=True).stdout.strip()
    return {"commit": head, "tree_changed": bool(changed)}
