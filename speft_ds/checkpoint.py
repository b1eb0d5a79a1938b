"""Checkpoints to resume from: DeepSpeed's own files (the partitioned delta values and their optimizer
states, the LR schedule) plus, in safetensors, what the recipe needs to continue exactly: the step, the
masks and the deltas that mask updates folded into the base weights. The frozen base is never written.

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
from safetensors import safe_open
from safetensors.torch import save_file

from .config import ConfigError, TrainingError
from .distributed import device, is_communication_failure
from .masks import FoldedDeltas

STATE_FILE = "speft_state.safetensors"
LATEST = "latest"


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


@dataclass
class ResumePoint:
    step: int
    indices: dict[str, torch.Tensor]
    folded: FoldedDeltas
    summary: dict
    root: Path
    tag: str


def _steps(root: Path) -> list[int]:
    return sorted(int(p.name.split("-", 1)[1]) for p in root.glob("step-*") if p.name.split("-", 1)[1].isdigit())


def save(engine, output_dir: str | Path, step: int, indices: dict[str, torch.Tensor], folded: FoldedDeltas,
         score_summary: dict, keep_last: int | None) -> None:
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
                               client_state={"torch_rng_state": torch.get_rng_state()})
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
        error = _attempt(_write_state, root / tmp_tag, step, indices, folded, score_summary)
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


def _write_state(directory: Path, step: int, indices: dict[str, torch.Tensor], folded: FoldedDeltas,
                 score_summary: dict) -> None:
    tensors = {f"indices/{name}": idx.cpu().contiguous() for name, idx in indices.items()}
    for name, parts in folded.parts.items():
        for i, (idx, values) in enumerate(parts):
            tensors[f"folded/{i}/indices/{name}"] = idx.contiguous()
            tensors[f"folded/{i}/values/{name}"] = values.contiguous()
    save_file(tensors, str(directory / STATE_FILE),
              metadata={"step": str(step), "score_summary": json.dumps(score_summary),
                        # safetensors returns keys sorted; the engine's parameter order is this one
                        "layer_order": json.dumps(list(indices))})


def find(output_dir: str | Path, resume: str) -> tuple[Path, str]:
    """(checkpoint root, tag) for --resume: 'latest', or a step-N directory inside OUTPUT_DIR/checkpoints.

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
    return root, tag


def read_state(root: Path, tag: str) -> ResumePoint:
    """The recipe's own state (safetensors: nothing unpickled)."""
    with safe_open(str(root / tag / STATE_FILE), framework="pt") as handle:
        metadata = handle.metadata()
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    indices = {name: tensors[f"indices/{name}"] for name in json.loads(metadata["layer_order"])}
    folded = FoldedDeltas()
    prefixes = sorted({tuple(key.split("/", 2)[:2]) for key in tensors if key.startswith("folded/")},
                      key=lambda prefix: int(prefix[1]))
    for _, i in prefixes:  # in folding order; each part keeps its layers' (indices, values)
        for key in sorted(k for k in tensors if k.startswith(f"folded/{i}/indices/")):
            name = key[len(f"folded/{i}/indices/"):]
            folded.parts[name].append((tensors[key], tensors[f"folded/{i}/values/{name}"]))
    return ResumePoint(int(metadata["step"]), indices, folded, json.loads(metadata["score_summary"]), root, tag)


def load_engine_state(engine, point: ResumePoint) -> None:
    """Restore the delta values, optimizer states, LR schedule and this rank's RNG state."""
    _, client_state = engine.load_checkpoint(str(point.root), tag=point.tag, load_module_strict=False)
    torch.set_rng_state(client_state["torch_rng_state"])
