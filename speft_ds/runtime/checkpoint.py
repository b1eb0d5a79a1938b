"""Checkpoints to resume from, in safetensors only (nothing is unpickled), each rank writing what it holds.

OUTPUT_DIR/checkpoints/step-N/ holds
- rank-R-of-W.safetensors, one per rank: its slices of the trained values and their AdamW moments (the
  optimizer's fp32 partitions), of a method's state kept per slice (SPEFT's index lists, RoseLoRA's
  scores), each with its [start, stop) in the whole flat tensor, and the rank's RNG states. No rank
  gathers anything: a save costs each rank its own partition, and the trained state is on disk once.
- speft_state.safetensors, from rank 0: the step, the optimizer's step, learning rates and loss scale, the
  LR schedule, the batch layout, and the method's own whole state (SPEFT: deltas folded in by mask updates).
The frozen base is never written.

A resume on any number of ranks reads, for each slice it now holds, the parts of the saved slices that
overlap it (safetensors reads a range without loading the rest). On as many ranks as wrote it each rank
takes its own RNG states; on another number every rank takes rank 0's: all ranks start from one seed and
draw alike (per-rank draws such as dropout refuse such a resume, recipe.py).

Layout: OUTPUT_DIR/checkpoints/step-N/ and OUTPUT_DIR/checkpoints/latest (the newest complete tag). A
checkpoint is written under a temporary tag, renamed when every rank has finished, and `latest` is
replaced last, so a process killed while saving leaves the previous checkpoint in place.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator
from safetensors import safe_open
from safetensors.torch import save_file

from ..config import ConfigError, TrainConfig, TrainingError
from . import zero3
from .safetensors_stream import SafetensorsWriter
from .distributed import device

STATE_FILE = "speft_state.safetensors"
LATEST = "latest"
ENGINE = "engine"  # the metadata key of the optimizer's and schedule's state in STATE_FILE


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def _rank_file(directory: Path, rank: int, world_size: int) -> Path:
    return directory / f"rank-{rank:05d}-of-{world_size:05d}.safetensors"


@dataclass
class ResumePoint:
    step: int
    method: str
    state: dict[str, torch.Tensor]  # the method's whole tensors
    meta: dict  # and its JSON metadata
    engine: dict  # the optimizer's step, learning rates, loss scale, LR schedule and batch layout
    directory: Path
    # every rank file, opened (memory-mapped) once: (its handle, key -> [start, stop) in the whole tensor)
    _files: list[tuple[object, dict]] = field(default_factory=list, init=False, repr=False)

    def rank_file(self, rank: int):
        """The open file rank `rank` wrote."""
        if not self._files:
            ranks = self.engine["layout"]["world_size"]
            for saved in range(ranks):
                handle = safe_open(str(_rank_file(self.directory, saved, ranks)), framework="pt")
                self._files.append((handle, json.loads(handle.metadata()["ranges"])))
        return self._files[rank][0]

    def read_whole(self, key: str) -> torch.Tensor:
        """The whole flat tensor `key`, from every rank's slice of it."""
        return _read_range(self._slices(key), 0, None)

    def read_slice(self, key: str, param: torch.nn.Parameter) -> torch.Tensor:
        """This rank's slice of tensor `key`, laid out like `param`'s partition now (padded like its
        ds_tensor), from the saved slices that overlap it."""
        start, stop = zero3.shard_range(param)
        mine = _read_range(self._slices(key), start, stop)
        return torch.nn.functional.pad(mine, (0, zero3.shard_numel(param) - (stop - start)))

    def _slices(self, key: str) -> list[tuple[int, int, object]]:
        """(start, stop, lazy slice) of every saved slice of `key`."""
        self.rank_file(0)
        return [(*ranges[key], handle.get_slice(key)) for handle, ranges in self._files]


def _read_range(slices: list[tuple[int, int, object]], start: int, stop: int | None) -> torch.Tensor:
    """Elements [start, stop) (stop None: to the end) of a whole flat tensor saved as `slices`."""
    stop = max(s for _, s, _ in slices) if stop is None else stop
    parts = [lazy[max(start, begin) - begin:min(stop, end) - begin] for begin, end, lazy in slices
             if begin < stop and end > start]
    return torch.cat(parts) if parts else slices[0][2][0:0]


def _steps(root: Path) -> list[int]:
    return sorted(int(p.name.split("-", 1)[1]) for p in root.glob("step-*") if p.name.split("-", 1)[1].isdigit())


def save(engine, output_dir: str | Path, step: int, method: str, state: dict[str, torch.Tensor], meta: dict,
         slices: dict[str, tuple[torch.nn.Parameter, torch.Tensor]], keep_last: int | None) -> None:
    """Every rank calls this and writes its own file; rank 0 also writes the whole state (`state`, `meta`).
    `slices`: the method's state kept per slice, as (the parameter it is laid out like, this rank's slice).
    A write that fails on any rank (a full disk, say) fails the save on every rank with a TrainingError; the
    previous checkpoint stays."""
    root = checkpoint_root(output_dir)
    tmp_tag, tag = f".tmp-step-{step}", f"step-{step}"
    rank = dist.get_rank()
    error = _attempt(_fresh_directory, root / tmp_tag) if rank == 0 else None
    _fail_together(error, root, tmp_tag, tag)  # the directory exists before any rank writes into it
    error = _attempt(_write_rank_file, root / tmp_tag, engine, slices)
    if rank == 0 and error is None:
        error = _attempt(_write_state, root / tmp_tag, step, method, state, {**meta, ENGINE: _engine_state(engine)})
    _fail_together(error, root, tmp_tag, tag)  # every rank's files are complete past this point
    if rank == 0:
        error = _attempt(_publish, root, tmp_tag, tag, keep_last)
    _fail_together(error, root, tmp_tag, tag)


def _trained(engine) -> list[tuple[str, torch.nn.Parameter]]:
    return [(name, param) for name, param in engine.module.named_parameters() if param.requires_grad]


def _fresh_directory(directory: Path) -> None:
    shutil.rmtree(directory, ignore_errors=True)  # left by a run killed while saving
    directory.mkdir(parents=True)


def _write_rank_file(directory: Path, engine, slices: dict[str, tuple[torch.nn.Parameter, torch.Tensor]]) -> None:
    """This rank's slices (without padding) of the trained values, their moments (once the optimizer has
    stepped: a fresh optimizer after a mask update has none) and the method's per-slice state, each with
    its range in the whole flat tensor, and this rank's RNG states; written one tensor at a time, straight
    from the optimizer's partitions."""
    moments = zero3.adam_step(engine) > 0
    tensors, ranges = {}, {}
    for name, param in _trained(engine):
        for key, value in zero3.local_trained_state(param, moments).items():
            tensors[f"{name}/{key}"], ranges[f"{name}/{key}"] = value, zero3.shard_range(param)
    for key, (param, mine) in slices.items():
        start, stop = zero3.shard_range(param)
        tensors[key], ranges[key] = mine.flatten()[:stop - start], (start, stop)
    tensors["rng/torch"] = torch.get_rng_state()
    tensors["rng/accelerator"] = get_accelerator().get_rng_state()
    writer = SafetensorsWriter(_rank_file(directory, dist.get_rank(), dist.get_world_size()),
                               {key: (t.dtype, [t.numel()]) for key, t in tensors.items()},
                               {"ranges": json.dumps(ranges)})
    try:
        for key, tensor in tensors.items():
            writer.add(key, tensor)
        writer.close()
    except BaseException:
        writer.abandon()  # the partial checkpoint goes as a whole (_fail_together)
        raise


def _engine_state(engine) -> dict:
    layout = {"world_size": dist.get_world_size(), "micro_batch_size": engine.train_micro_batch_size_per_gpu(),
              "gradient_accumulation_steps": engine.gradient_accumulation_steps()}
    return {"layout": layout, "adam_step": zero3.adam_step(engine), "lr": engine.get_lr(),
            "loss_scale": zero3.loss_scale_state(engine), "lr_scheduler": engine.lr_scheduler.state_dict()}


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
    written by a run of the same method."""
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
        metadata = handle.metadata()
    if ENGINE not in metadata:
        raise ConfigError(f"--resume: {root / tag} was written by an older speft-ds, in DeepSpeed's pickled files: "
                          "resume it with the speft-ds that wrote it, or train again")
    written_by = metadata.get("method", "speft")
    if written_by != method:
        raise ConfigError(f"--resume: {root / tag} is a checkpoint of --peft {written_by}, not {method}: resume "
                          f"with --peft {written_by}")
    return root, tag


def batch_layout(root: Path, tag: str) -> dict:
    """The checkpoint's world_size, micro_batch_size and gradient_accumulation_steps."""
    with safe_open(str(root / tag / STATE_FILE), framework="pt") as handle:
        return json.loads(handle.metadata()[ENGINE])["layout"]


def model_dropout(model_config) -> list[str]:
    """The model's own dropout probabilities above 0 (LLaMA's attention_dropout, say)."""
    return [f"{key} {value}" for key, value in model_config.to_dict().items()
            if key.endswith("dropout") and isinstance(value, (int, float)) and value > 0]


def keep_checkpoint_batches(config: TrainConfig, ds_config: dict, saved: dict, world_size: int,
                            per_micro_batch: list[str]) -> tuple[TrainConfig, dict, str | None]:
    """The config and DeepSpeed config a resume trains with: the checkpoint's global batch, cut into the
    same micro-batches (train_micro_batches keeps the examples of each step and of each micro-batch whatever
    the number of ranks), with gradient_accumulation_steps derived for `world_size`; and the line rank 0
    prints when that differs from what was asked. A ConfigError where no accumulation fits, or where
    randomness drawn per micro-batch on each rank (`per_micro_batch`: dropout) could not be replayed."""
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
    """The recipe's whole state (safetensors: nothing unpickled); the ranks' slices stay on disk."""
    with safe_open(str(root / tag / STATE_FILE), framework="pt") as handle:
        metadata = {key: json.loads(value) if key not in ("step", "method") else value
                    for key, value in handle.metadata().items()}
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    step, method, engine = int(metadata.pop("step")), metadata.pop("method"), metadata.pop(ENGINE)
    return ResumePoint(step, method, tensors, metadata, engine, root / tag)


def load_engine_state(engine, point: ResumePoint) -> None:
    """Restore the trained values and AdamW moments (each rank reading the slices it holds now), the
    optimizer's step, learning rates and loss scale, the LR schedule, and the RNG states (host and
    accelerator: LoRA's dropout draws from the accelerator's)."""
    saved = point.engine
    if saved["adam_step"]:
        zero3.start_adam_state(engine, saved["adam_step"])
    for name, param in _trained(engine):
        if zero3.is_persistent(param):  # ZeRO-3 keeps it whole on every rank, and it is small
            zero3.set_trained_value(param, point.read_whole(f"{name}/value"))
        else:
            zero3.set_trained_slice(param, point.read_slice(f"{name}/value", param))
        if saved["adam_step"]:
            zero3.set_local_moments(param, {key: point.read_slice(f"{name}/{key}", param)
                                            for key in zero3.ADAM_MOMENTS})
    zero3.set_loss_scale_state(engine, saved["loss_scale"])
    engine.lr_scheduler.load_state_dict(saved["lr_scheduler"])
    for group, lr in zip(engine.optimizer.param_groups, saved["lr"]):  # as DeepSpeed's loader restores them
        group["lr"] = lr
    engine.global_steps = point.step
    engine.global_samples = point.step * engine.train_batch_size()
    same = saved["layout"]["world_size"] == dist.get_world_size()
    handle = point.rank_file(dist.get_rank() if same else 0)
    torch.set_rng_state(handle.get_tensor("rng/torch"))
    get_accelerator().set_rng_state(handle.get_tensor("rng/accelerator"))
