"""Checkpoints: a run killed with SIGKILL after a checkpoint and resumed ends bitwise where an uninterrupted
run ends (fp32 on CPU, 2 ranks under the DeepSpeed launcher, dynamic drop/regrow masks included)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time
from itertools import islice
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from speft_ds.config import EMBEDDED_DATASET
from speft_ds.distributed import free_port
from tests.models import write_tiny_llama

REPO = Path(__file__).resolve().parents[1]
STEPS, SAVE_EVERY = 8, 2


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    model_dir = write_tiny_llama(root / "llama")
    dataset = root / "data.jsonl"
    dataset.write_text("".join(islice(EMBEDDED_DATASET.open(), 48)))
    return root, model_dir, dataset


def _command(model_dir: Path, dataset: Path, out: Path, *extra: str) -> list[str]:
    return ["deepspeed", "--num_gpus", "2", "--master_port", str(free_port()), "launch/train.py",
            "--model", str(model_dir), "--dataset", str(dataset), "--output_dir", str(out),
            "--max_steps", str(STEPS), "--save_steps", str(SAVE_EVERY), "--micro_batch_size", "2",
            "--learning_rate", "1e-2", "--warmup_steps", "2", "--calibration_examples", "16", "--density", "0.05",
            "--seq_len", "48", "--logging_steps", "1", "--val_size", "0.1", "--mask_update_steps", "4",
            "--mask_update", "drop_regrow", "--regrow_fraction", "0.25", *extra]


def _env():
    return {**os.environ, "DS_ACCELERATOR": "cpu"}


def _steps_logged(out: Path) -> list[int]:
    path = out / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines()
            if line.strip() and "step" in json.loads(line) and "event" not in json.loads(line)]


def _adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


def test_killed_and_resumed_run_ends_bitwise_like_an_uninterrupted_one(inputs):
    root, model_dir, dataset = inputs
    straight = root / "straight"
    proc = subprocess.run(_command(model_dir, dataset, straight), cwd=REPO, capture_output=True, text=True,
                          env=_env(), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]

    interrupted = root / "interrupted"
    kill_after = random.randint(SAVE_EVERY + 1, STEPS - 1)  # a random step after at least one checkpoint
    job = subprocess.Popen(_command(model_dir, dataset, interrupted), cwd=REPO, env=_env(),
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 600
    while max(_steps_logged(interrupted), default=0) < kill_after:
        assert job.poll() is None, "the run ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.05)
    os.killpg(job.pid, signal.SIGKILL)
    job.wait()
    assert not (interrupted / "adapter").exists()
    assert (interrupted / "checkpoints" / "latest").is_file(), f"no checkpoint before step {kill_after}"

    resumed = subprocess.run(_command(model_dir, dataset, interrupted, "--resume"), cwd=REPO,
                             capture_output=True, text=True, env=_env(), timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    want, got = _adapter(straight), _adapter(interrupted)
    assert want.keys() == got.keys()
    for key in want:
        assert torch.equal(want[key], got[key]), f"{key} differs after a kill at step {kill_after}"
    assert _steps_logged(interrupted) == list(range(1, STEPS + 1))
    tags = sorted(p.name for p in (interrupted / "checkpoints").iterdir() if p.is_dir())
    assert tags == [f"step-{s}" for s in range(SAVE_EVERY, STEPS + 1, SAVE_EVERY)]  # no temporary tag left
    assert (interrupted / "checkpoints" / "latest").read_text() == f"step-{STEPS}"


def test_checkpoint_size_grows_with_k_and_holds_no_base_weights(inputs):
    root, model_dir, dataset = inputs
    sizes = {}
    for density in ("0.01", "0.2"):
        out = root / f"density-{density}"
        proc = subprocess.run(_command(model_dir, dataset, out, "--density", density, "--max_steps", "2",
                                       "--save_total_limit", "1"),
                              cwd=REPO, capture_output=True, text=True, env=_env(), timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        tags = [p for p in (out / "checkpoints").iterdir() if p.is_dir()]
        assert [p.name for p in tags] == ["step-2"]
        sizes[density] = sum(f.stat().st_size for f in tags[0].rglob("*") if f.is_file())
    base_bytes = (model_dir / "model.safetensors").stat().st_size
    k_bytes = 0.2 * base_bytes  # the trainable values are about density x the base's weights
    assert sizes["0.2"] > sizes["0.01"] + 0.5 * k_bytes  # grows with k (values + two AdamW moments)
    assert sizes["0.01"] < 0.5 * base_bytes  # no frozen base weights inside


def test_resume_needs_a_checkpoint_of_this_output_dir(inputs, tmp_path):
    root, model_dir, dataset = inputs
    proc = subprocess.run(_command(model_dir, dataset, tmp_path / "fresh", "--resume"), cwd=REPO,
                          capture_output=True, text=True, env=_env(), timeout=300)
    assert proc.returncode == 2 and "no checkpoint" in proc.stderr


def test_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(inputs):
    root, model_dir, dataset = inputs
    out = root / "diverges"
    # An absurd learning rate makes the deltas overflow after the first update.
    proc = subprocess.run(_command(model_dir, dataset, out, "--learning_rate", "1e38", "--save_steps", "1",
                                   "--max_grad_norm", "0"),
                          cwd=REPO, capture_output=True, text=True, env=_env(), timeout=600)
    assert proc.returncode == 1, proc.stderr[-3000:]
    # Ranks share the launcher's pipes, so another rank's output may precede the message on its line.
    errors = [line[line.index("error: "):] for line in (proc.stdout + proc.stderr).splitlines() if "error: " in line]
    assert len(errors) == 1 and "loss is not finite" in errors[0], proc.stdout[-2000:] + proc.stderr[-2000:]
    assert not (out / "adapter").exists()
    good = (out / "checkpoints" / "latest").read_text()
    bad_step = int(errors[0].split("step ")[1].split(":")[0])
    assert good == f"step-{bad_step - 1}" and (out / "checkpoints" / good / "speft_state.safetensors").is_file()
