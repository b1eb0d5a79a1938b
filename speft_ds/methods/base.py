"""The one interface through which the recipe runs a fine-tuning method (after HF PEFT's tuners: each
method is one folder, this is what the recipe may call).

A run, as the recipe drives it: `plan` (before any weight is loaded) -> `prepare` (a salience pass, or
nothing) -> `inject` -> DeepSpeed engine over `inject`'s parameters -> training steps, with
`after_backward` and `after_step` around each optimizer step and `update` every `update_every` steps ->
`save_adapter`. A resumed run calls `restore` instead of `prepare` and `inject`, from what
`checkpoint_state` and `checkpoint_slices` gave the checkpoint.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch
import torch.distributed as dist
from torch import nn

from ..config import TrainingError
from ..runtime.checkpoint import ResumePoint
from ..runtime.distributed import device


@dataclass
class RunContext:
    """What a method may read of the run: the plan (config, DeepSpeed config, data, targets), the metrics log,
    this rank's place, and the memory record taken before the model was loaded."""
    plan: object
    log: object
    rank: int
    world_size: int
    start_memory: dict


class Method:
    """Base class: every hook does nothing unless the method needs it."""

    name = "method"

    def __init__(self, config):
        self.config = config

    def plan(self, model_config, skeleton: nn.Module, target_shapes: dict, ds_config: dict, world_size: int,
             bf16: bool, accelerator) -> None:
        """Decide and check what the method needs before any weight is loaded (raise ConfigError early)."""

    def check_run_length(self, total_steps: int) -> None:
        """Refuse (ConfigError) a run too short for what the method does during it; checked before loading."""

    @classmethod
    def randomness_per_micro_batch(cls, config) -> list[str]:
        """The flags (with their values) under which the method draws random numbers per micro-batch on each
        rank, like dropout: such draws follow the ranks' layout, so a resume on another number of ranks
        cannot replay them."""
        return []

    def describe(self) -> str | None:
        """One line for the start of a run (rank 0 prints it), or None."""
        return None

    def prepare(self, model: nn.Module, ctx: RunContext) -> None:
        """Work before training on the loaded, partitioned model (SPEFT: salience and selection)."""

    def inject(self, model: nn.Module, ctx: RunContext) -> list[nn.Parameter]:
        """Put the method's layers into the model; returns the trainable parameters."""
        raise NotImplementedError

    def restore(self, model: nn.Module, ctx: RunContext, point: ResumePoint) -> list[nn.Parameter]:
        """`inject` as it stood when the checkpoint `point` was written (its `state` and `meta` are what
        `checkpoint_state` returned; `read_whole` and `read_slice` read what `checkpoint_slices` gave);
        returns the trainable parameters, whose values the checkpoint then restores."""
        raise NotImplementedError

    def trainable_record(self, engine) -> dict:
        """The metrics record describing the trainable part (a collective)."""
        raise NotImplementedError

    def after_backward(self, engine, step: int) -> None:
        """After the last backward of optimizer step `step`, before the step (every rank)."""

    def after_step(self, engine, step: int) -> None:
        """After optimizer step `step` (every rank)."""

    @property
    def update_every(self) -> int:
        """Optimizer steps between `update` calls; 0: never."""
        return 0

    def update(self, engine, model: nn.Module, ctx: RunContext, update: int, completed_steps: int, make_engine):
        """Change the trainable part after `completed_steps` (SPEFT's mask updates). `make_engine(params,
        completed_steps)` builds a fresh engine; returns the engine training from here on."""
        raise NotImplementedError

    def without_update(self) -> AbstractContextManager | None:
        """A context inside which the model computes as the base model does (the update switched off, nothing
        moved), or None where the method cannot do that cheaply; --retention_text's KL needs it."""
        return None

    def checkpoint_state(self, engine) -> tuple[dict[str, torch.Tensor], dict]:
        """What `restore` needs beyond the trained values and their optimizer state, held whole: tensors and
        JSON-able metadata, which rank 0 writes (every rank calls this)."""
        return {}, {}

    def checkpoint_slices(self) -> dict[str, tuple[tuple[int, int], torch.Tensor]]:
        """What `restore` needs that each rank keeps: key -> (the range it covers, this rank's tensor); for
        state laid out like a parameter's partition, checkpoint.slice_of(param, slice). Each rank writes its
        own; nothing is gathered."""
        return {}

    def save_adapter(self, engine, ctx: RunContext, path) -> None:
        """Write the adapter (a collective: every rank gathers, rank 0 writes)."""
        raise NotImplementedError


def write_streamed(rank: int, path: Path, open_writer: Callable[[], object], pieces: Iterable[tuple],
                   finish: Callable[[object], None]) -> None:
    """Every rank walks `pieces` (each one module's whole tensors, gathered by collectives as it comes);
    rank 0 opens a writer (StreamedAdapter) and adds each piece before the next is gathered, so no rank holds
    more than one module's, then `finish(writer)`. A failure on rank 0 is kept until the collectives are done,
    then becomes one TrainingError on every rank (write_on_rank_zero)."""
    writer, failed = None, None
    if rank == 0:
        try:
            writer = open_writer()
        except Exception as err:
            failed = err
    for piece in pieces:
        if writer is not None and failed is None:
            try:
                writer.add(*piece)
            except Exception as err:
                failed = err
        del piece

    def complete() -> None:
        if failed is not None:
            if writer is not None:
                writer.abandon()
            raise failed
        finish(writer)

    write_on_rank_zero(rank, path, complete)


def write_on_rank_zero(rank: int, path: Path, write: Callable[[], None]) -> None:
    """Rank 0 runs `write` (an adapter into `path`); every rank learns whether it succeeded, and a failure
    becomes one TrainingError on every rank instead of a hang."""
    saved = torch.ones(1, device=device())
    if rank == 0:
        try:
            write()
        except BaseException as err:
            saved.zero_()
            dist.broadcast(saved, src=0)  # release the other ranks before raising
            if isinstance(err, Exception):  # a full disk (safetensors has its own error type), a bad path
                raise TrainingError(f"writing the adapter to {path} failed ({type(err).__name__}: {err}): check "
                                    "free space and permissions there and rerun; any checkpoint stays, and "
                                    "--resume starts from it") from err
            raise
    dist.broadcast(saved, src=0)
    if not saved.item():
        raise RuntimeError("rank 0 failed to write the adapter (its error is in rank 0's output)")
