"""Checkpoints to resume from: DeepSpeed's own files (the partitioned trainable parameters and their
optimizer states, the LR schedule) plus, in safetensors, what the recipe needs to continue exactly: the
step and the method's own state (SPEFT: the masks and the deltas that mask updates folded into the base
weights; RoseLoRA: its importance scores). The frozen base is never written.

Layout: OUTPUT_DIR/checkpoints/step-N/ and OUTPUT_DIR/checkpoints/latest (the newest complete tag). A
checkpoint is written under a temporary tag, renamed when every rank has finished, and `latest` is
replaced last, so a process killed while saving leaves the previous checkpoint in place.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator
from safetensors import safe_open
from safetensors.torch import save_file

from .config import ConfigError, TrainingError
from .distributed import device, is_communication_failure

STATE_FILE = "speft_state.safetensors"
LATEST = "latest"


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


@dataclass
class ResumePoint:
    step: int
    method: str
    state: dict[str, torch.Tensor]  # the method's tensors
    meta: dict  # and its JSON metadata
    root: Path
    tag: str


def _steps(root: Path) -> list[int]:
    return sorted(int(p.name.split("-", 1)[1]) for p in root.glob("step-*") if p.name.split("-", 1)[1].isdigit())


def save(engine, output_dir: str | Path, step: int, method: str, state: dict[str, torch.Tensor], meta: dict,
         keep_last: int | None) -> None:
    """Every rank calls this (DeepSpeed writes each rank's partition). A write that fails on any rank (a
    full disk, say) fails the save on every rank with a TrainingError; the previous checkpoint stays."""
    root = checkpoint_root(output_dir)
    tmp_tag, tag = f".tmp-step-{step}", f"step-{step}"
    rank = dist.get_rank()
    if rank == 0:
        shutil.rmtree(root / tmp_tag, ignore_errors=True)  # left by a run killed while saving
    error = None
    try:
        engine.save_checkpoint(str(root), tag=tmp_tag, save_latest=False, exclude_frozen_parameters=True,
                               client_state={"torch_rng_state": torch.get_rng_state(),
                                             "accelerator_rng_state": get_accelerator().get_rng_state()})
    except Exception as err:  # torch.save reports a full disk as a RuntimeError, safetensors as its own type
        if is_communication_failure(err):
            raise
        error = err
        # DeepSpeed writes its files between collectives and ends with a barrier, where the ranks whose
        # writes succeeded now wait: join it so every rank reaches the vote below. (Its checkpoint epilogue
        # gathers persistent parameters before that barrier; with a persistence threshold above 0 a rank
        # that failed earlier would meet the wrong collective, and the job fails as a lost rank instead.)
        dist.barrier()
    if rank == 0 and error is None:
        error = _attempt(_write_state, root / tmp_tag, step, method, state, meta)
    _fail_together(error, root, tmp_tag, tag)  # every rank's files are complete past this point
    if rank == 0:
        error = _attempt(_publish, root, tmp_tag, tag, keep_last)
    _fail_together(error, root, tmp_tag, tag)


def _attempt(write, *args) -> Exception | None:
    try:
        write(*args)
    except Exception as err:
        return err
    return None


def _fail_together(error: Exception | None, root: Path, tmp_tag: str, tag: str) -> None:
    """A vote: if any rank's write failed, every rank raises, after rank 0 removed the partial checkpoint."""
    failed = torch.tensor([error is not None], dtype=torch.int32, device=device())
    dist.all_reduce(failed, op=dist.ReduceOp.MAX)
    if not failed.item():
        return
    free_mib = shutil.disk_usage(root).free / 2**20
    if dist.get_rank() == 0:
        _discard(root, tmp_tag, tag)
    dist.barrier()
    kept = (root / LATEST).read_text().strip() if (root / LATEST).is_file() else None
    cause = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}" if error else "on another rank"
    raise TrainingError(f"saving checkpoint {tag} failed ({cause}; {free_mib:.0f} MiB free in {root}): free "
                        "space there or lower --save_total_limit. Training stopped; "
                        + (f"{kept} is kept: resume from it with --resume" if kept else "no earlier checkpoint"))


def _publish(root: Path, tmp_tag: str, tag: str, keep_last: int | None) -> None:
    """Make a complete checkpoint visible: rename it, then point `latest` at it, then drop the oldest."""
    shutil.rmtree(root / tag, ignore_errors=True)
    os.replace(root / tmp_tag, root / tag)
    (root / f".{LATEST}.tmp").write_text(tag)
    os.replace(root / f".{LATEST}.tmp", root / LATEST)
    if keep_last:
        for old in _steps(root)[:-keep_last]:
            shutil.rmtree(root / f"step-{old}")


def _discard(root: Path, tmp_tag: str, tag: str) -> None:
    """Remove what a failed save left, down to a renamed checkpoint that `latest` does not name yet."""
    shutil.rmtree(root / tmp_tag, ignore_errors=True)
    (root / f".{LATEST}.tmp").unlink(missing_ok=True)
    if (root / tag).exists() and not ((root / LATEST).is_file() and (root / LATEST).read_text().strip() == tag):
        shutil.rmtree(root / tag, ignore_errors=True)


def _write_state(directory: Path, step: int, method: str, state: dict[str, torch.Tensor], meta: dict) -> None:
    tensors = {key: t.cpu().contiguous() for key, t in state.items()}
    save_file(tensors, str(directory / STATE_FILE),
              metadata={"step": str(step), "method": method, **{key: json.dumps(value) for key, value in meta.items()}})


def find(output_dir: str | Path, resume: str, method: str) -> tuple[Path, str]:
    """(checkpoint root, tag) for --resume: 'latest', or a step-N directory inside OUTPUT_DIR/checkpoints,
    written by a run of the same method.

    Only checkpoints this tool wrote into its own output directory are accepted: DeepSpeed's loader
    unpickles them."""
    root = checkpoint_root(output_dir).resolve()
    if resume == "latest":
        if not (root / LATEST).is_file():
            raise ConfigError(f"--resume: no checkpoint in {root} (no '{LATEST}' file): train with --save_steps "
                              "first, or drop --resume")
        tag = (root / LATEST).read_text().strip()
    else:
        path = Path(resume).resolve()
        if path.parent != root:
            raise ConfigError(f"--resume {resume} is not a checkpoint of --output_dir ({root}): resume only from "
                              "checkpoints this run wrote")
        tag = path.name
    if not (root / tag / STATE_FILE).is_file():
        raise ConfigError(f"--resume: {root / tag} is not a complete speft-ds checkpoint")
    with safe_open(str(root / tag / STATE_FILE), framework="pt") as handle:
        written_by = handle.metadata().get("method", "speft")
    if written_by != method:
        raise ConfigError(f"--resume: {root / tag} is a checkpoint of --peft {written_by}, not {method}: resume "
                          f"with --peft {written_by}")
    return root, tag


def read_state(root: Path, tag: str) -> ResumePoint:
    """The recipe's own state (safetensors: nothing unpickled)."""
    with safe_open(str(root / tag / STATE_FILE), framework="pt") as handle:
        metadata = dict(handle.metadata())
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    step, method = int(metadata.pop("step")), metadata.pop("method", "speft")
    return ResumePoint(step, method, tensors, {key: json.loads(value) for key, value in metadata.items()}, root, tag)


def load_engine_state(engine, point: ResumePoint) -> None:
    """Restore the trainable parameters, optimizer states, LR schedule and this rank's RNG states (host and
    accelerator: LoRA's dropout draws from the accelerator's)."""
    _, client_state = engine.load_checkpoint(str(point.root), tag=point.tag, load_module_strict=False)
    torch.set_rng_state(client_state["torch_rng_state"])
    if "accelerator_rng_state" in client_state:  # absent from checkpoints written before it was kept
        get_accelerator().set_rng_state(client_state["accelerator_rng_state"])
