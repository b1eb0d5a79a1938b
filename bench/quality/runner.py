"""Runs the quality benchmark's jobs, each its own 2-rank DeepSpeed job on the CPU: a cell (train one method at
one setting, score its task's validation split, the held-out loss and the retention text) or a test scoring
(the cell's adapter on its task's test split, once, each question's result kept beside the record).

The retention text is /usr/share/common-licenses/GPL-3 from Debian's base-files package, present on every
Debian system (the GNU GPL v3: "Everyone is permitted to copy and distribute verbatim copies of this license
document"): general English legal prose that no task resembles.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from dataclasses import asdict

from bench.common.jobs import target_sizes
from bench.quality.plan import (BUDGETS, CALIBRATION, HYBRID_LORA_R, LONG_STEPS, METHODS, MICRO_BATCH, RETENTION,
                                SAVE_STEPS, SEQ_LEN, WORLD_SIZE, Budget)
from bench.quality.quality_tasks import write_long_train, write_task
from bench.quality.records import REPO, WORK, Cell, append_record, commit, questions_file
from speft_ds.config import DEFAULT_MODEL
from speft_ds.runtime.distributed import free_port


def trainable(budget: Budget, model: str) -> int:
    targeted, in_plus_out = target_sizes(model)
    return round(budget.density * targeted) if budget.density else budget.lora_r * in_plus_out


def _deepspeed(script: str, *args: str) -> subprocess.CompletedProcess:
    command = ["deepspeed", "--num_gpus", str(WORLD_SIZE), "--master_port", str(free_port()), script, *args]
    print(" ".join(command), flush=True)
    return subprocess.run(command, cwd=REPO, env={**os.environ, "DS_ACCELERATOR": "cpu"}, capture_output=True,
                          text=True)


def _model() -> str:
    from speft_ds.models.gguf import resolve_model

    return resolve_model(DEFAULT_MODEL)


def _size_flags(cell: Cell, model: str) -> tuple[list[str], list[str]]:
    """(compare_worker's flags, training flags) that give the cell's method its budget."""
    budget = BUDGETS[cell.budget]
    worker = METHODS[cell.method][0]
    if worker == "lora":
        return ["--lora_r", str(budget.lora_r)], ["--target_modules", budget.lora_targets] if budget.lora_targets else []
    if worker == "rosa":  # LoRA r = HYBRID_LORA_R on every targeted linear, the sparse part the rest
        return (["--lora_r", str(HYBRID_LORA_R)],
                ["--num_trainable", str(trainable(budget, model) - trainable(Budget(lora_r=HYBRID_LORA_R), model))])
    return [], ["--num_trainable", str(trainable(budget, model))] if worker == "speft" else []


def _length_flags(cell: Cell) -> list[str]:
    """A long cell trains on the long training file and saves every SAVE_STEPS steps; a rerun resumes it."""
    if cell.steps != LONG_STEPS:
        return ["--dataset", str(write_task(cell.task, WORK / "tasks").train)]
    resume = ["--resume"] if (WORK / cell.tag / "checkpoints" / "latest").is_file() else []
    return ["--dataset", str(write_long_train(cell.task, WORK / "tasks")), "--save_steps", str(SAVE_STEPS),
            "--save_total_limit", "2", *resume]


def run_cell(cell: Cell, keep_record: bool = True) -> dict:
    """Train one cell and score its validation task; append its record (a failed run as one too: a diverged
    rate is a result of the sweep) unless `keep_record` is False (a cell trained again for its test)."""
    model = _model()
    files = write_task(cell.task, WORK / "tasks")
    worker, extra = METHODS[cell.method]
    worker_flags, size_flags = _size_flags(cell, model)
    result = WORK / f"{cell.tag}.json"
    result.unlink(missing_ok=True)
    started, load = time.time(), os.getloadavg()[0]
    proc = _deepspeed(
        "bench/common/compare_worker.py", "--method", worker, *worker_flags, "--result", str(result),
        "--warmup_steps_excluded", "1",
        "--", "--model", model, *_length_flags(cell), "--eval_task", str(files.validation),
        "--retention_text", str(RETENTION), "--seq_len", str(SEQ_LEN), "--micro_batch_size", str(MICRO_BATCH),
        "--max_steps", str(max(cell.steps, 1)), "--warmup_steps", str(cell.steps // 10),
        "--learning_rate", str(cell.lr or 1e-3), "--weight_decay", str(cell.weight_decay), "--seed", str(cell.seed),
        "--calibration_examples", str(CALIBRATION), "--val_size", "0.05", "--logging_steps", "10",
        "--output_dir", str(WORK / cell.tag), "--overwrite_output_dir",
        # the base is scored once, in its own cell: every other cell starts from it
        "--eval_on_start", "false", *size_flags, *extra)
    record = {**asdict(cell), **commit(), "load_avg_1m": [load, os.getloadavg()[0]], "job_s": time.time() - started}
    if proc.returncode == 0:
        record.update(json.loads(result.read_text()), method=cell.method)  # the worker's "method" is its kind
    else:
        record.update(failed=(proc.stdout + proc.stderr).strip().splitlines()[-3:])
    if keep_record:
        append_record(record)
    return record


def run_test(cell: Cell) -> dict:
    """Score a cell's adapter (the base: the model as loaded) on its task's test split, once, keeping each
    question's result; the cell is trained again (without a new record) where this machine no longer has
    its adapter."""
    adapter = WORK / cell.tag / "adapter"
    retrained = cell.method != "base" and not adapter.is_dir()
    if retrained and "failed" in run_cell(cell, keep_record=False):
        record = {"test_of": asdict(cell), **commit(), "protocol": 3, "failed": True}
        append_record(record)
        return record
    files = write_task(cell.task, WORK / "tasks")
    output = WORK / f"{cell.tag}-test.json"
    output.unlink(missing_ok=True)  # a scoring stopped before its record: scored again
    proc = _deepspeed("launch/evaluate.py", "--model", _model(), "--task", str(files.test), "--output", str(output),
                      *([] if cell.method == "base" else ["--adapter", str(adapter)]))
    if proc.returncode != 0:
        raise RuntimeError(f"scoring {cell.tag} on the test split failed:\n{proc.stderr[-2000:]}")
    scored = json.loads(output.read_text())
    path = questions_file(cell)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({key: p[key] for key in ("correct", "output", "choice") if key in p}) + "\n"
                            for p in scored["predictions"]))
    record = {"test_of": asdict(cell), **commit(), "protocol": 3, "accuracy": scored["accuracy"],
              "stderr": scored["stderr"], "examples": scored["examples"], "retrained": retrained,
              "questions": path.name}
    append_record(record)
    return record
