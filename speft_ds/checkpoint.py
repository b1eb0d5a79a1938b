"""Checkpoints to resume from: DeepSpeed's own files (the partitioned trainable parameters and their
optimizer states, the LR schedule) plus, in safetensors, what the recipe needs to continue exactly: the
step and the method's own state (SPEFT: the masks and the deltas that mask updates folded into the base
weights; RoseLoRA: its importance scores). The frozen base is never written.

DeepSpeed refuses a ZeRO-3 checkpoint written by another number of ranks, so the safetensors file also
holds a copy that does not depend on it (the "portable" part): the whole trained values and AdamW moments,
the optimizer's step and learning rates, the LR schedule, rank 0's RNG states and the batch layout. A resume
on the same number of ranks loads DeepSpeed's files (bitwise, nothing gathered); on another, the portable
part.

Layout: OUTPUT_DIR/checkpoints/step-N/ and OUTPUT_DIR/checkpoints/latest (the newest complete tag). A
checkpoint is written under a temporary tag, renamed when every rank has finished, and `latest` is
replaced last, so a process killed while saving leaves the previous checkpoint in place.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator
from safetensors import safe_open
from safetensors.torch import save_file

from . import zero3
from .config import ConfigError, TrainConfig, TrainingError
from .distributed import device, is_communication_failure

STATE_FILE = "speft_state.safetensors"
LATEST = "latest"
PORTABLE = "portable"  # the metadata key, and the tensors' key prefix, of the world-size-independent copy


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
    portable: dict | None  # the portable part's metadata (its tensors are read only when needed)


def _steps(root: Path) -> list[int]:
    return sorted(int(p.name.split("-", 1)[1]) for p in root.glob("step-*") if p.name.split("-", 1)[1].isdigit())


def save(engine, output_dir: str | Path, step: int, method: str, state: dict[str, torch.Tensor], meta: dict,
         keep_last: int | None) -> None:
    """Every rank calls this (DeepSpeed writes each rank's partition). A write that fails on any rank (a
    full disk, say) fails the save on every rank with a TrainingError; the previous checkpoint stays."""
    root = checkpoint_root(output_dir)
    tmp_tag, tag = f".tmp-step-{step}", f"step-{step}"
    rank = dist.get_rank()
    portable, portable_meta = _portable_state(engine, keep=rank == 0)
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
        error = _attempt(_write_state, root / tmp_tag, step, method, {**state, **portable},
                         {**meta, PORTABLE: portable_meta})
    _fail_together(error, root, tmp_tag, tag)  # every rank's files are complete past this point
    if rank == 0:
        error = _attempt(_publish, root, tmp_tag, tag, keep_last)
    _fail_together(error, root, tmp_tag, tag)


def _trained(engine) -> list[tuple[str, torch.nn.Parameter]]:
    return [(name, param) for name, param in engine.module.named_parameters() if param.requires_grad]


def _portable_state(engine, keep: bool) -> tuple[dict[str, torch.Tensor], dict]:
    """The portable part: tensors (kept only where `keep`) and metadata. Gathers every trained parameter
    and its moments whole, one at a time (collectives on every rank)."""
    step = zero3.adam_step(engine)  # 0: a fresh optimizer (after a reselect) has no moments yet
    tensors = {}
    for name, param in _trained(engine):
        whole = {"value": zero3.gather_full_fp32(param), **(zero3.adam_moments(param) if step else {})}
        if keep:
            tensors.update({f"{PORTABLE}/{name}/{key}": t for key, t in whole.items()})
    tensors[f"{PORTABLE}/rng/torch"] = torch.get_rng_state()
    tensors[f"{PORTABLE}/rng/accelerator"] = get_accelerator().get_rng_state()
    layout = {"world_size": dist.get_world_size(), "micro_batch_size": engine.train_micro_batch_size_per_gpu(),
              "gradient_accumulation_steps": engine.gradient_accumulation_steps()}
    return tensors, {"layout": layout, "adam_step": step, "lr": engine.get_lr(),
                     "lr_scheduler": engine.lr_scheduler.state_dict()}


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


def batch_layout(root: Path, tag: str) -> dict | None:
    """The checkpoint's world_size, micro_batch_size and gradient_accumulation_steps (None if written before
    checkpoints kept them)."""
    with safe_open(str(root / tag / STATE_FILE), framework="pt") as handle:
        portable = handle.metadata().get(PORTABLE)
    return json.loads(portable)["layout"] if portable else None


def model_dropout(model_config) -> list[str]:
    """The model's own dropout probabilities above 0 (LLaMA's attention_dropout, say)."""
    return [f"{key} {value}" for key, value in model_config.to_dict().items()
            if key.endswith("dropout") and isinstance(value, (int, float)) and value > 0]


def keep_checkpoint_batches(config: TrainConfig, ds_config: dict, saved: dict | None, world_size: int,
                            per_micro_batch: list[str]) -> tuple[TrainConfig, dict, str | None]:
    """The config and DeepSpeed config a resume trains with: the checkpoint's global batch, cut into the
    same micro-batches (train_micro_batches keeps the examples of each step and of each micro-batch whatever
    the number of ranks), with gradient_accumulation_steps derived for `world_size`; and the line rank 0
    prints when that differs from what was asked. A ConfigError where no accumulation fits, or where
    randomness drawn per micro-batch on each rank (`per_micro_batch`: dropout) could not be replayed."""
    if saved is None:  # a checkpoint from before the layout was kept: DeepSpeed accepts only its own
        return config, ds_config, None
    ranks, micro, accumulation = saved["world_size"], saved["micro_batch_size"], saved["gradient_accumulation_steps"]
    global_batch = ranks * micro * accumulation
    written = (f"--resume: the checkpoint was trained on {ranks} ranks x micro-batches of {micro} x {accumulation} "
               f"accumulation steps (global batch {global_batch})")
    if config.micro_batch_size != micro:
        raise ConfigError(f"{written}: resume with --micro_batch_size {micro}, which keeps its micro-batches")
    if global_batch % (micro * world_size):
        raise ConfigError(f"{written}, which {world_size} ranks cannot split into whole micro-batches: resume on a "
                          f"number of ranks that divides {global_batch // micro}")
    if world_size != ranks and per_micro_batch:
        raise ConfigError(f"{written}: {', '.join(per_micro_batch)} draws per micro-batch on each rank, which "
                          f"{world_size} ranks cannot replay: resume on {ranks} ranks")
    derived = global_batch // (micro * world_size)
    note = None
    if world_size != ranks or derived != config.gradient_accumulation_steps:
        note = (f"resume: global batch {global_batch} as in the checkpoint ({ranks} ranks x {micro} x {accumulation}); "
                f"on {world_size} ranks: gradient_accumulation_steps {derived}")
    # "auto": the derived value replaces a concrete one, which was the checkpoint's run's
    return (replace(config, gradient_accumulation_steps=derived),
            {**ds_config, "gradient_accumulation_steps": "auto"}, note)


def read_state(root: Path, tag: str) -> ResumePoint:
    """The recipe's own state (safetensors: nothing unpickled), the portable part's tensors left on disk."""
    with safe_open(str(root / tag / STATE_FILE), framework="pt") as handle:
        metadata = {key: json.loads(value) if key not in ("step", "method") else value
                    for key, value in handle.metadata().items()}
        tensors = {key: handle.get_tensor(key) for key in handle.keys() if not key.startswith(f"{PORTABLE}/")}
    step, method, portable = int(metadata.pop("step")), metadata.pop("method", "speft"), metadata.pop(PORTABLE, None)
    return ResumePoint(step, method, tensors, metadata, root, tag, portable)


def load_engine_state(engine, point: ResumePoint) -> None:
    """Restore the trainable parameters, optimizer states, LR schedule and this rank's RNG states (host and
    accelerator: LoRA's dropout draws from the accelerator's): from DeepSpeed's files when the checkpoint was
    written by as many ranks as run now, from the portable part otherwise."""
    if point.portable and point.portable["layout"]["world_size"] != dist.get_world_size():
        _load_portable(engine, point)
        return
    _, client_state = engine.load_checkpoint(str(point.root), tag=point.tag, load_module_strict=False)
    torch.set_rng_state(client_state["torch_rng_state"])
    if "accelerator_rng_state" in client_state:  # absent from checkpoints written before it was kept
        get_accelerator().set_rng_state(client_state["accelerator_rng_state"])


def _load_portable(engine, point: ResumePoint) -> None:
    """The portable part into a new engine on another number of ranks: each rank takes its slices of the
    whole values and moments. Every rank takes rank 0's RNG states: all ranks start from one seed and draw
    alike (per-rank draws such as dropout refuse a resume on another world size, recipe.py)."""
    meta = point.portable
    with safe_open(str(point.root / point.tag / STATE_FILE), framework="pt") as handle:
        moments = {}
        for name, param in _trained(engine):
            zero3.set_trained_value(param, handle.get_tensor(f"{PORTABLE}/{name}/value"))
            if meta["adam_step"]:
                moments[param] = {key: handle.get_tensor(f"{PORTABLE}/{name}/{key}") for key in zero3.ADAM_MOMENTS}
        torch.set_rng_state(handle.get_tensor(f"{PORTABLE}/rng/torch"))
        get_accelerator().set_rng_state(handle.get_tensor(f"{PORTABLE}/rng/accelerator"))
    if moments:
        zero3.seed_adam_state(engine, meta["adam_step"], moments)
    engine.lr_scheduler.load_state_dict(meta["lr_scheduler"])
    for group, lr in zip(engine.optimizer.param_groups, meta["lr"]):  # as DeepSpeed's loader restores them
        group["lr"] = lr
