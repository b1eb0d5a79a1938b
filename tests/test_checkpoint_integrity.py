"""What a checkpoint guarantees (runtime/checkpoint_files.py, resume_checks.py), on real 2-rank runs of the tiny
model under the DeepSpeed launcher:

- retention by write order: after a resume from an earlier step, the newest writes stay, `latest` resumable;
- a rank file zeroed (what a crash before the data reached the disk leaves), truncated or missing is found
  before the model loads: `latest` falls back to the newest verified checkpoint with one line, a checkpoint
  named explicitly is refused naming the file; a crash between the steps of publishing loses nothing;
- a resume that would change the data or the trained state is refused naming the flag; betas, eps and
  weight decay come from the checkpoint with one line; run_config.yaml keeps the first run and records the
  resume;
- SPEFT's folded deltas are kept per rank, inside each rank's shard, and a resume opens only the rank files
  it needs.
"""

from __future__ import annotations

import gc
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from speft_ds.cli import parse_config
from speft_ds.config import ConfigError
from speft_ds.runtime import checkpoint_files
from speft_ds.runtime.checkpoint import STATE_FILE, find, read_state
from speft_ds.runtime.distributed import free_port
from tests.models import tiny_job

REPO = Path(__file__).resolve().parents[1]
# drop/regrow at step 4 folds deltas into the base: the checkpoints from step 4 on hold folded parts
STEPS, SAVE_EVERY = 6, 2


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    return tiny_job(tmp_path_factory.mktemp("integrity"), 48)


def _args(job, out: Path, *extra: str) -> list[str]:
    _, model_dir, dataset = job
    return ["--model", str(model_dir), "--dataset", str(dataset), "--output_dir", str(out), "--max_steps", str(STEPS),
            "--save_steps", str(SAVE_EVERY), "--micro_batch_size", "2", "--seq_len", "48", "--calibration_examples",
            "16", "--density", "0.05", "--learning_rate", "1e-2", "--val_size", "0.1", "--logging_steps", "1",
            "--eval_task", "none", "--mask_update_steps", "4", "--mask_update", "drop_regrow", *extra]


def _train(job, out: Path, *extra: str, expect: int = 0) -> str:
    proc = subprocess.run(["deepspeed", "--num_gpus", "2", "--master_port", str(free_port()), "launch/train.py",
                           *_args(job, out, *extra)], cwd=REPO, env={**os.environ, "DS_ACCELERATOR": "cpu"},
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == expect, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def first(job) -> Path:
    """The uninterrupted run: checkpoints step-2, step-4 and step-6, and its adapter."""
    out = job[0] / "first"
    _train(job, out)
    return out


def _copy(run: Path, out: Path, tags: list[str]) -> Path:
    """`out` holding copies of the run's checkpoints `tags` (the last one `latest`) and its metrics.jsonl."""
    for tag in tags:
        shutil.copytree(run / "checkpoints" / tag, out / "checkpoints" / tag)
    (out / "checkpoints" / "latest").write_text(tags[-1])
    shutil.copy(run / "metrics.jsonl", out / "metrics.jsonl")
    return out


def _adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


def _errors(text: str) -> list[str]:
    return [line[line.index("error: "):] for line in text.splitlines() if "error: " in line]


def test_retention_keeps_the_newest_writes_after_a_resume_from_an_earlier_step(job, first, tmp_path):
    """step-4 and step-6 on disk; resumed from step-4 with --save_steps 5 --save_total_limit 1, the run writes
    step-5, the newest write: it stays, step-6 (an abandoned branch) goes, and `latest` resumes."""
    out = _copy(first, tmp_path / "branch", ["step-4", "step-6"])
    _train(job, out, "--resume", str(out / "checkpoints" / "step-4"), "--save_steps", "5", "--save_total_limit", "1")
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "step-5"]
    assert find(out, "latest", "speft")[1:] == ("step-5", None)
    sequences = {tag: checkpoint_files.read_manifest(first / "checkpoints" / tag)["sequence"]
                 for tag in ("step-2", "step-4", "step-6")}
    assert sequences == {"step-2": 1, "step-4": 2, "step-6": 3}
    assert checkpoint_files.read_manifest(out / "checkpoints" / "step-5")["sequence"] == 4


def _break(path: Path, how: str) -> None:
    if how == "zeroed":  # what a crash before the data reached the disk leaves: the size stays
        path.write_bytes(bytes(path.stat().st_size))
    elif how in ("flipped", "header"):  # one byte of the last tensor's data, or of the header's length
        data = bytearray(path.read_bytes())
        data[-1 if how == "flipped" else 5] ^= 0xFF
        path.write_bytes(bytes(data))
    elif how == "truncated":
        path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])
    else:
        path.unlink()


@pytest.mark.parametrize("how", ["zeroed", "flipped", "header", "truncated", "missing"])
def test_a_broken_rank_file_is_found_and_latest_falls_back_to_the_newest_verified(first, tmp_path, how):
    out = _copy(first, tmp_path / how, ["step-2", "step-4"])
    broken = out / "checkpoints" / "step-4" / "rank-00001-of-00002.safetensors"
    _break(broken, how)
    root, tag, note = find(out, "latest", "speft")
    assert tag == "step-2" and note.startswith(f"resume: step-4 is not a whole checkpoint ({broken}")
    assert note.endswith("resuming from step-2, the newest verified one")
    with pytest.raises(ConfigError, match=f"--resume {out / 'checkpoints' / 'step-4'} is broken: {broken}"):
        find(out, str(out / "checkpoints" / "step-4"), "speft")


def test_a_resume_falls_back_before_the_model_loads_and_restores_the_optimizers_settings(job, first, tmp_path):
    """A zeroed rank file in `latest`'s checkpoint: the resume says so in one line, continues from the previous
    checkpoint, takes weight decay from it (this run asks another) and ends bitwise where the first run ended;
    run_config.yaml keeps the first run's settings and records the resume. Named explicitly, the broken one is
    refused before anything is loaded."""
    out = _copy(first, tmp_path / "fallback", ["step-2", "step-4"])
    shutil.copy(first / "run_config.yaml", out / "run_config.yaml")
    broken = out / "checkpoints" / "step-4" / "rank-00000-of-00002.safetensors"
    _break(broken, "zeroed")
    metrics = (out / "metrics.jsonl").read_bytes()
    refused = _train(job, out, "--resume", str(out / "checkpoints" / "step-4"), expect=2)
    assert _errors(refused) == [f"error: --resume {out / 'checkpoints' / 'step-4'} is broken: {broken} cannot be "
                                "read (JSONDecodeError). Resume from another checkpoint (--resume alone takes the "
                                "newest verified one)"]
    assert (out / "metrics.jsonl").read_bytes() == metrics  # nothing ran

    output = _train(job, out, "--resume", "--weight_decay", "0.3")
    assert output.count("resume: step-4 is not a whole checkpoint") == 1
    assert output.count("resume: weight_decay 0.0 restored from the checkpoint (this run's flags ask weight_decay "
                        "0.3)") == 1
    want, got = _adapter(first), _adapter(out)
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    lines = (out / "run_config.yaml").read_text().splitlines()
    assert "weight_decay: 0.0" in lines and lines[-1].startswith("# resumed ")
    assert "from checkpoints/step-2 on 2 ranks" in lines[-1]
    assert "weight_decay" not in lines[-1]  # the weight decay it trained with is the first run's


def test_a_crash_between_the_steps_of_publishing_loses_nothing(first, tmp_path, monkeypatch):
    """Publishing step-4 again: the old one set aside, then the crash before the new one is renamed into place.
    The resume puts the old one back and resumes from it; the unpublished one is never resumed from and goes
    at the next save."""
    out = _copy(first, tmp_path / "publish", ["step-2", "step-4"])
    root = out / "checkpoints"
    shutil.copytree(root / "step-4", root / ".tmp-step-4")
    real, calls = os.replace, []

    def crash_on_second(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise KeyboardInterrupt("the node went down")
        real(src, dst)

    monkeypatch.setattr(checkpoint_files.os, "replace", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        checkpoint_files.publish(root, ".tmp-step-4", "step-4")
    monkeypatch.setattr(checkpoint_files.os, "replace", real)
    assert sorted(p.name for p in root.iterdir()) == [".old-step-4", ".tmp-step-4", "latest", "step-2"]
    with pytest.raises(ConfigError, match="is a save that never finished"):
        find(out, str(root / ".tmp-step-4"), "speft")
    assert find(out, "latest", "speft")[1:] == ("step-4", None)
    assert checkpoint_files.read_manifest(root / "step-4") == checkpoint_files.read_manifest(
        first / "checkpoints" / "step-4")
    checkpoint_files.remove_leftovers(root)
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-2", "step-4"]


def test_without_latest_the_newest_verified_checkpoint_is_taken(first, tmp_path):
    out = _copy(first, tmp_path / "no-latest", ["step-2", "step-4"])
    (out / "checkpoints" / "latest").unlink()
    assert find(out, "latest", "speft")[1:] == (
        "step-4", f"resume: {out / 'checkpoints'} has no 'latest'; resuming from step-4, the newest verified one")


def test_a_file_retention_cannot_remove_is_left_with_one_warning(first, tmp_path, monkeypatch, capsys):
    """On NFS a file another process holds open cannot be deleted: retention warns and training goes on."""
    out = _copy(first, tmp_path / "busy", ["step-2", "step-4", "step-6"])
    real_rmtree = checkpoint_files.shutil.rmtree

    def busy(path, ignore_errors=False):
        if not ignore_errors:
            raise OSError(16, "Device or resource busy", str(path))
        real_rmtree(path, ignore_errors=True)

    monkeypatch.setattr(checkpoint_files.shutil, "rmtree", busy)
    checkpoint_files.retain(out / "checkpoints", 2, "step-6")
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 1 and "could not remove all of" in warnings[0] and "step-2" in warnings[0]


@pytest.mark.parametrize("flag,value,named", [
    ("--seed", "7", "--seed differs from the checkpoint's run (it was 42, this run has 7), which would change the "
                    "data or their order"),
    ("--val_size", "0.2", "--val_size differs"),
    ("--density", "0.1", "--density differs from the checkpoint's run (it was 0.05, this run has 0.1), which would "
                         "change the trained state"),
    ("--dataset", "OTHER", "--dataset differs from the checkpoint's run (its contents differ)"),
    ("--dataset", "TWICE", "--dataset differs from the checkpoint's run (its contents differ)"),
    ("--mask_update_steps", "2", "--mask_update_steps differs from the checkpoint's run (it was 4, this run has 2), "
                                 "which would change how a mask still to come is chosen"),
])
def test_a_resume_that_changes_the_data_or_the_state_is_refused_naming_the_flag(job, first, tmp_path, flag, value,
                                                                                 named, monkeypatch):
    from speft_ds.recipe import plan_run

    monkeypatch.setenv("WORLD_SIZE", "2")  # the checkpoint's layout, so only the flag under test differs
    out = _copy(first, tmp_path / "refused", ["step-2"])
    if value == "OTHER":  # the same examples, one changed
        lines = job[2].read_text().splitlines(keepends=True)
        value = str(tmp_path / "other.jsonl")
        Path(value).write_text(lines[0].replace("Question", "Q") + "".join(lines[1:]))
    if value == "TWICE":  # a mixture: each of its datasets hashed
        value = f"{job[2]},{job[2]}"
    config, explicit = parse_config(_args(job, out, "--resume", flag, value))
    with pytest.raises(ConfigError, match="^" + re.escape(f"--resume: {named}")):
        plan_run(config, explicit)


def test_folded_deltas_are_kept_per_rank_inside_its_shard(first):
    """After the drop/regrow at step 4, each rank file holds its own folded entries, all inside the range of
    the base weight's shard it records; rank 0's whole state holds none of them."""
    step = first / "checkpoints" / "step-6"
    with safe_open(str(step / STATE_FILE), framework="pt") as handle:
        assert not any(key.startswith("folded/") for key in handle.keys())
        layout = json.loads(handle.metadata()["folded"])
    assert layout and all(count == 1 for count in layout.values())
    found = 0
    for rank in range(2):
        with safe_open(str(step / f"rank-{rank:05d}-of-00002.safetensors"), framework="pt") as handle:
            ranges = json.loads(handle.metadata()["ranges"])
            for key in (k for k in handle.keys() if k.startswith("folded/0/indices/")):
                indices, (start, stop) = handle.get_tensor(key), ranges[key]
                assert ((indices >= start) & (indices < stop)).all()
                found += indices.numel()
    assert found > 0


def _mapped(path: Path) -> bool:
    return str(path) in Path("/proc/self/maps").read_text()


def test_a_resume_opens_only_the_rank_files_it_reads_and_lets_them_go(first):
    """A read of the entries of rank 1's shard opens rank 1's file alone; once closed (and the tensors read
    dropped), no rank file stays mapped, and the state file never does."""
    step = first / "checkpoints" / "step-6"
    point = read_state(step.parent, step.name)
    assert not _mapped(step / STATE_FILE)  # its tensors are copies
    key = next(k for k in point.ranges[1] if k.startswith("folded/0/indices/") and point.ranges[1][k][0] > 0)
    start, stop = point.ranges[1][key]
    pieces = point.read_pieces(key, start, stop)
    assert len(pieces) == 1 and set(point._open) == {1}
    rank_file = step / "rank-00001-of-00002.safetensors"
    assert _mapped(rank_file)
    del pieces
    point.close()
    gc.collect()
    assert not _mapped(rank_file) and not _mapped(step / "rank-00000-of-00002.safetensors")


def test_every_checkpoint_file_is_readable_by_every_user(first):
    step = first / "checkpoints" / "step-6"
    for path in [step, *step.iterdir()]:
        assert path.stat().st_mode & 0o777 == (0o755 if path.is_dir() else 0o644), path
