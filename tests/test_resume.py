"""Checkpoints: a run killed with SIGKILL after a checkpoint and resumed ends bitwise where an uninterrupted
run ends (fp32 on CPU, 2 ranks under the DeepSpeed launcher, SPEFT's dynamic drop/regrow masks, LoRA, and
RoseLoRA's importance scores and pruning included)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from speft_ds.distributed import free_port
from tests.models import write_dataset, write_tiny_llama

REPO = Path(__file__).resolve().parents[1]
STEPS, SAVE_EVERY = 8, 2
SPEFT_FLAGS = ("--mask_update_steps", "4", "--mask_update", "drop_regrow", "--regrow_fraction", "0.25")
# RoseLoRA prunes from step 3 on: a kill after the step-2 checkpoint resumes into the schedule
LORA_FLAGS = ("--lora_r", "4", "--rose_start", "0.25", "--rose_end", "0.75", "--rose_sparsity", "0.75")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    model_dir = write_tiny_llama(root / "llama")
    dataset = root / "data.jsonl"
    write_dataset(dataset, 48)
    return root, model_dir, dataset


def _command(model_dir: Path, dataset: Path, out: Path, *extra: str, peft: str = "speft") -> list[str]:
    return ["deepspeed", "--num_gpus", "2", "--master_port", str(free_port()), "launch/train.py",
            "--model", str(model_dir), "--dataset", str(dataset), "--output_dir", str(out),
            "--max_steps", str(STEPS), "--save_steps", str(SAVE_EVERY), "--micro_batch_size", "2",
            "--learning_rate", "1e-2", "--warmup_steps", "2", "--calibration_examples", "16", "--density", "0.05",
            "--seq_len", "48", "--logging_steps", "1", "--val_size", "0.1", "--peft", peft,
            *(SPEFT_FLAGS if peft == "speft" else LORA_FLAGS), *extra]


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


@pytest.fixture(scope="module")
def straight(inputs) -> Path:
    """The output directory of the run uninterrupted."""
    root, model_dir, dataset = inputs
    out = root / "straight"
    proc = subprocess.run(_command(model_dir, dataset, out), cwd=REPO, capture_output=True, text=True,
                          env=_env(), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def _assert_same_adapter(want: Path, got: Path, context: str) -> None:
    want, got = _adapter(want), _adapter(got)
    assert want.keys() == got.keys()
    for key in want:
        assert torch.equal(want[key], got[key]), f"{key} differs {context}"


def _resume(model_dir: Path, dataset: Path, out: Path, *extra: str, peft: str = "speft") -> None:
    resumed = subprocess.run(_command(model_dir, dataset, out, *extra, "--resume", peft=peft), cwd=REPO,
                             capture_output=True, text=True, env=_env(), timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-4000:]


def test_killed_and_resumed_run_ends_bitwise_like_an_uninterrupted_one(inputs, straight):
    _kill_resume_and_compare(inputs, straight, "speft")


@pytest.mark.parametrize("peft", ["lora", "roselora"])
def test_lora_methods_killed_and_resumed_end_bitwise_like_uninterrupted(inputs, peft):
    root, model_dir, dataset = inputs
    out = root / f"straight-{peft}"
    proc = subprocess.run(_command(model_dir, dataset, out, peft=peft), cwd=REPO, capture_output=True, text=True,
                          env=_env(), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _kill_resume_and_compare(inputs, out, peft)
    wrong = subprocess.run(_command(model_dir, dataset, root / f"interrupted-{peft}", "--resume",
                                    "--overwrite_output_dir"), cwd=REPO,
                           capture_output=True, text=True, env=_env(), timeout=300)
    assert wrong.returncode == 2 and f"checkpoint of --peft {peft}" in wrong.stderr


def _kill_resume_and_compare(inputs, straight: Path, peft: str) -> None:
    root, model_dir, dataset = inputs
    interrupted = root / f"interrupted-{peft}"
    kill_after = random.randint(SAVE_EVERY + 1, STEPS - 1)  # a random step after at least one checkpoint
    job = subprocess.Popen(_command(model_dir, dataset, interrupted, peft=peft), cwd=REPO, env=_env(),
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

    _resume(model_dir, dataset, interrupted, peft=peft)
    _assert_same_adapter(straight, interrupted, f"after a kill at step {kill_after}")
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


def _checkpoint_dirs(out: Path) -> list[str]:
    try:
        return [entry.name for entry in os.scandir(out / "checkpoints") if entry.is_dir()]
    except FileNotFoundError:
        return []


def test_a_kill_during_a_save_leaves_the_previous_checkpoint_resumable(inputs, straight):
    root, model_dir, dataset = inputs
    out = root / "killed-while-saving"
    job = subprocess.Popen(_command(model_dir, dataset, out, "--save_steps", "1"), cwd=REPO, env=_env(),
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    # Poll fast: a save of the tiny model takes a fraction of a second, and each step from 3 on saves once.
    while not any(name.startswith(".tmp-step-") and name != ".tmp-step-1" and name != ".tmp-step-2"
                  for name in _checkpoint_dirs(out)):
        assert job.poll() is None, "the run ended before a save could be interrupted"
        time.sleep(0.001)
    os.killpg(job.pid, signal.SIGKILL)
    job.wait()
    saving = next(name for name in _checkpoint_dirs(out) if name.startswith(".tmp-step-"))
    latest = (out / "checkpoints" / "latest").read_text()
    assert latest == f"step-{int(saving.rsplit('-', 1)[1]) - 1}"  # the previous one, complete
    assert (out / "checkpoints" / latest / "speft_state.safetensors").is_file()

    _resume(model_dir, dataset, out, "--save_steps", "1")
    _assert_same_adapter(straight, out, f"after a kill while writing {saving}")
    assert not any(name.startswith(".tmp") for name in _checkpoint_dirs(out))


def _pages(path: Path) -> int:
    return -(-path.stat().st_size // 4096) * 4096  # tmpfs allocates whole pages


@pytest.mark.parametrize("fails_in", ["deepspeed", "state"])
def test_a_full_disk_fails_the_save_loudly_and_keeps_the_previous_checkpoint(inputs, straight, tmp_path, fails_in):
    """The output directory lives on a tmpfs (mounted in a private user and mount namespace, so no root is
    needed) sized so that the second save runs out of space in DeepSpeed's files or in ours."""
    root, model_dir, dataset = inputs
    checkpoints = straight / "checkpoints"
    # What the run holds after its first save (DeepSpeed also copies its zero_to_*.py scripts beside the
    # checkpoints), plus a page for metrics.jsonl to grow.
    first = sum(_pages(f) for f in [straight / "metrics.jsonl", *checkpoints.glob("*"),
                                    *(checkpoints / f"step-{SAVE_EVERY}").iterdir()] if f.is_file()) + 4096
    second = checkpoints / f"step-{2 * SAVE_EVERY}"
    state_file = _pages(second / "speft_state.safetensors")
    deepspeed_files = sum(_pages(f) for f in second.iterdir()) - state_file
    size = first + (4096 if fails_in == "deepspeed" else deepspeed_files + state_file - 2 * 4096)
    mount, kept = tmp_path / "small-disk", tmp_path / "kept"
    mount.mkdir()
    # The tmpfs vanishes with the namespace: copy what the run left there out before leaving it.
    script = ('size=$1 mnt=$2 keep=$3; shift 3; mount -t tmpfs -o size=$size tmpfs $mnt && "$@"; status=$?; '
              'cp -a $mnt/out $keep; exit $status')
    proc = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script, "sh",
                           str(int(size)), str(mount), str(kept), *_command(model_dir, dataset, mount / "out")],
                          cwd=REPO, capture_output=True, text=True, env=_env(), timeout=600)
    assert proc.returncode == 1, proc.stderr[-3000:]
    errors = [line[line.index("error: "):] for line in (proc.stdout + proc.stderr).splitlines() if "error: " in line]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert errors[0].startswith(f"error: saving checkpoint step-{2 * SAVE_EVERY} failed") \
        and f"step-{SAVE_EVERY} is kept" in errors[0], errors[0]
    # rank 0 names its own error, or says the save failed on another rank
    assert ("SafetensorError" in errors[0]) == (fails_in == "state"), errors[0]
    assert not (kept / "adapter").exists()
    assert _checkpoint_dirs(kept) == [f"step-{SAVE_EVERY}"]  # no partial checkpoint left
    assert (kept / "checkpoints" / "latest").read_text() == f"step-{SAVE_EVERY}"

    _resume(model_dir, dataset, kept)  # on a disk with room, from the kept checkpoint
    _assert_same_adapter(straight, kept, "after a save failed for lack of space")
