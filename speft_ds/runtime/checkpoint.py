"""Checkpoints to resume from, in safetensors only (nothing is unpickled), each rank writing what it holds.

OUTPUT_DIR/checkpoints/step-N/ holds
- rank-R-of-W.safetensors, one per rank: its slices of the trained values and their AdamW moments (the
  optimizer's fp32 partitions), a method's state kept per rank (SPEFT's index lists, its folded deltas,
  RoseLoRA's scores), each with the range it covers, and the rank's RNG states. No rank gathers anything:
  a save costs each rank its own partition, and the trained state is on disk once.
- speft_state.safetensors, from rank 0: the step, the optimizer's step and parameter groups' settings, the
  loss scale, the LR schedule, the batch layout, the run's settings a resume must keep (resume_checks.py)
  and the method's small whole state.
- manifest.json, written last: sizes, hashes and ranges (checkpoint_files.py: what a checkpoint guarantees).
The frozen base is never written.

A resume on any number of ranks verifies the checkpoint first, then reads, for each slice it now holds, the
parts of the saved slices that overlap it, opening only those ranks' files (safetensors reads a range
without loading the rest; a tensor read whole opens every file), and closes them once loaded. On as many ranks as wrote it each rank takes its
own RNG states; on another number every rank takes rank 0's: all ranks start from one seed and draw alike
(per-rank draws such as dropout refuse such a resume, recipe.py).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator
from safetensors import safe_open
from safetensors.torch import save_file

from ..config import ConfigError, TrainingError
from . import checkpoint_files as files
from . import zero3
from .distributed import device, from_rank_0, on_every_rank
from .safetensors_stream import SafetensorsWriter

STATE_FILE = "speft_state.safetensors"
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
    engine: dict  # the optimizer's step and param groups, loss scale, LR schedule and batch layout
    directory: Path
    ranges: list[dict]  # per saved rank: key -> [start, stop) of its slice (the manifest's copy)
    # the rank files opened so far (memory-mapped), by saved rank; `close` lets them go
    _open: dict[int, object] = field(default_factory=dict, init=False, repr=False)

    def rank_file(self, rank: int):
        """The open file saved rank `rank` wrote (opened on first use)."""
        if rank not in self._open:
            self._open[rank] = safe_open(str(_rank_file(self.directory, rank, len(self.ranges))), framework="pt")
        return self._open[rank]

    def close(self) -> None:
        """Let go of the rank files once their slices are loaded: a deleted file held open (NFS) stays on disk."""
        self._open.clear()

    def read_whole(self, key: str) -> torch.Tensor:
        """The whole flat tensor `key`, from every rank's slice of it."""
        return _read_range(self._slices(key, 0, None), 0, None)

    def read_slice(self, key: str, param: torch.nn.Parameter) -> torch.Tensor:
        """This rank's slice of tensor `key`, laid out like `param`'s partition now (padded like its
        ds_tensor), from the saved slices that overlap it (only their files are opened)."""
        start, stop = zero3.shard_range(param)
        mine = _read_range(self._slices(key, start, stop), start, stop)
        return torch.nn.functional.pad(mine, (0, zero3.shard_numel(param) - (stop - start)))

    def read_pieces(self, key: str, start: int, stop: int) -> list[torch.Tensor]:
        """Each saved rank's whole tensor `key` whose recorded range overlaps [start, stop), in rank order (for
        state kept per rank by the range it covers, not as slices of one tensor)."""
        return [self.rank_file(rank).get_tensor(key) for rank, ranges in enumerate(self.ranges)
                if ranges[key][0] < stop and ranges[key][1] > start]

    def _slices(self, key: str, start: int, stop: int | None) -> list[tuple[int, int, object]]:
        """(start, stop, lazy slice) of every saved slice of `key` that overlaps [start, stop) (rank 0's where
        none does, for the dtype of an empty result)."""
        overlapping = [rank for rank, ranges in enumerate(self.ranges)
                       if stop is None or (ranges[key][0] < stop and ranges[key][1] > start)]
        return [(*self.ranges[rank][key], self.rank_file(rank).get_slice(key)) for rank in overlapping or [0]]


def _read_range(slices: list[tuple[int, int, object]], start: int, stop: int | None) -> torch.Tensor:
    """Elements [start, stop) (stop None: to the end) of a whole flat tensor saved as `slices`."""
    stop = max(s for _, s, _ in slices) if stop is None else stop
    parts = [lazy[max(start, begin) - begin:min(stop, end) - begin] for begin, end, lazy in slices
             if begin < stop and end > start]
    return torch.cat(parts) if parts else slices[0][2][0:0]


def save(engine, output_dir: str | Path, step: int, method: str, state: dict[str, torch.Tensor], meta: dict,
         slices: dict[str, tuple[tuple[int, int], torch.Tensor]], keep_last: int | None) -> None:
    """Every rank calls this and writes its own file; rank 0 also writes the whole state (`state`, `meta`) and,
    last, the manifest. `slices`: the method's state kept per rank, as (the range it covers, this rank's
    tensor). A write that fails on any rank (a full disk, say) fails the save on every rank with a
    TrainingError; the previous checkpoint stays."""
    root = checkpoint_root(output_dir)
    tmp_tag, tag = f"{files.TMP_PREFIX}step-{step}", f"step-{step}"
    rank = dist.get_rank()
    error = _attempt(_fresh_directory, root, tmp_tag) if rank == 0 else None
    _fail_together(error, root, tmp_tag, tag)  # the directory exists before any rank writes into it
    written = None
    try:
        written = _write_rank_file(root / tmp_tag, engine, slices)
    except Exception as err:
        error = err
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, written)  # each rank's (file name, record, ranges): a few KiB
    if rank == 0 and error is None and None not in every:
        error = _attempt(_write_state_and_manifest, root, tmp_tag, step, method, state,
                         {**meta, ENGINE: _engine_state(engine)}, every)
    _fail_together(error, root, tmp_tag, tag)  # every file is complete and fsynced past this point
    if rank == 0:
        error = _attempt(_publish, root, tmp_tag, tag, keep_last)
    _fail_together(error, root, tmp_tag, tag)


def slice_of(param: torch.nn.Parameter, mine: torch.Tensor) -> tuple[tuple[int, int], torch.Tensor]:
    """A method's per-slice state laid out like `param`'s partition, as `save` takes it: the range of the
    whole flat tensor this rank holds, and its elements there (a ds_tensor's padding cut)."""
    start, stop = zero3.shard_range(param)
    return (start, stop), mine.flatten()[:stop - start]


def _trained(engine) -> list[tuple[str, torch.nn.Parameter]]:
    return [(name, param) for name, param in engine.module.named_parameters() if param.requires_grad]


def _fresh_directory(root: Path, tmp_tag: str) -> None:
    root.mkdir(parents=True, exist_ok=True)
    files.remove_leftovers(root)  # of a save killed midway
    (root / tmp_tag).mkdir()


def _write_rank_file(directory: Path, engine, slices: dict[str, tuple[tuple[int, int], torch.Tensor]]
                     ) -> tuple[str, dict, dict]:
    """This rank's slices (without padding) of the trained values, their moments (once the optimizer has
    stepped: a fresh optimizer after a mask update has none) and the method's per-rank state, each with
    its range, and this rank's RNG states; written one tensor at a time, straight from the optimizer's
    partitions. Returns the file's name, its manifest record and its ranges."""
    moments = zero3.adam_step(engine) > 0
    tensors, ranges = {}, {}
    for name, param in _trained(engine):
        for key, value in zero3.local_trained_state(param, moments).items():
            tensors[f"{name}/{key}"], ranges[f"{name}/{key}"] = value, zero3.shard_range(param)
    for key, (covered, mine) in slices.items():
        tensors[key], ranges[key] = mine.flatten(), tuple(covered)
    tensors["rng/torch"] = torch.get_rng_state()
    tensors["rng/accelerator"] = get_accelerator().get_rng_state()
    path = _rank_file(directory, dist.get_rank(), dist.get_world_size())
    writer = SafetensorsWriter(path, {key: (t.dtype, [t.numel()]) for key, t in tensors.items()},
                               {"ranges": json.dumps(ranges)})
    try:
        for key, tensor in tensors.items():
            writer.add(key, tensor)
        writer.close()
    except BaseException:
        writer.abandon()  # the partial checkpoint goes as a whole (_fail_together)
        raise
    return path.name, files.file_record(path, writer.hashes), {key: list(r) for key, r in ranges.items()}


# What a parameter group of the optimizer keeps beside its parameters, saved and restored whole.
GROUP_SETTINGS = ("lr", "betas", "eps", "weight_decay")


def _engine_state(engine) -> dict:
    layout = {"world_size": dist.get_world_size(), "micro_batch_size": engine.train_micro_batch_size_per_gpu(),
              "gradient_accumulation_steps": engine.gradient_accumulation_steps()}
    groups = [{key: group[key] for key in GROUP_SETTINGS if key in group} for group in engine.optimizer.param_groups]
    return {"layout": layout, "adam_step": zero3.adam_step(engine), "param_groups": groups,
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
        _discard(root, tmp_tag)
    dist.barrier()
    kept = files.latest_tag(root)
    cause = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}" if error else "on another rank"
    raise TrainingError(f"saving checkpoint {tag} failed ({cause}; {free_mib:.0f} MiB free in {root}): free "
                        "space there or lower --save_total_limit. Training stopped; "
                        + (f"{kept} is kept: resume from it with --resume" if kept else "no earlier checkpoint"))


def _publish(root: Path, tmp_tag: str, tag: str, keep_last: int | None) -> None:
    files.publish(root, tmp_tag, tag)
    if keep_last:
        files.retain(root, keep_last, tag)


def _discard(root: Path, tmp_tag: str) -> None:
    """Remove what a failed save left, and put back a checkpoint its publish had set aside. A checkpoint it
    renamed into place stays: it is whole (the manifest is written before any rename), and `latest` still
    names the previous one."""
    shutil.rmtree(root / tmp_tag, ignore_errors=True)
    (root / f".{files.LATEST}.tmp").unlink(missing_ok=True)
    files.recover(root)


def _write_state_and_manifest(root: Path, tmp_tag: str, step: int, method: str, state: dict[str, torch.Tensor],
                              meta: dict, ranks: list[tuple[str, dict, dict]]) -> None:
    """Rank 0's whole state, then the manifest: every file's size and hashes, every rank file's ranges, the
    step and this save's sequence number (one above the newest checkpoint's)."""
    directory = root / tmp_tag
    tensors = {key: t.cpu().contiguous() for key, t in state.items()}
    save_file(tensors, str(directory / STATE_FILE),
              metadata={"step": str(step), "method": method, **{key: json.dumps(value) for key, value in meta.items()}})
    files.fsync_path(directory / STATE_FILE)
    records = {name: record for name, record, _ in ranks}
    records[STATE_FILE] = files.file_record(directory / STATE_FILE)
    files.write_manifest(directory, step, files.next_sequence(root), records, [r for _, _, r in ranks])


def find(output_dir: str | Path, resume: str, method: str) -> tuple[Path, str, str | None]:
    """(checkpoint root, tag, a line for rank 0 or None) for --resume: 'latest', or a step-N directory inside
    OUTPUT_DIR/checkpoints, written by a run of the same method and verified whole (sizes, then hashes: each
    rank its share of the files where a process group exists). Where `latest` names a checkpoint that is
    missing or broken, the newest verified one by write order is taken, and the line says so; a checkpoint
    named explicitly must be whole. With a process group every rank decides on rank 0's view of the
    directory and on every rank's checks, so all resume from the same checkpoint or all refuse."""
    root = checkpoint_root(output_dir).resolve()
    if resume != "latest":
        path = Path(resume).resolve()
        if path.parent != root:
            raise ConfigError(f"--resume {resume} is not a checkpoint of --output_dir ({root}): resume only from "
                              "checkpoints this run wrote")
        if path.name.startswith((files.TMP_PREFIX, files.ASIDE_PREFIX)):
            raise ConfigError(f"--resume {resume} is a save that never finished: resume from a step-N checkpoint, "
                              "or pass --resume alone for the newest verified one")
        if problem := _problem(root, path.name, method):
            raise ConfigError(f"--resume {resume} is broken: {problem}. Resume from another checkpoint (--resume "
                              "alone takes the newest verified one)")
        return root, path.name, None
    def look():
        if root.is_dir():
            files.recover(root)  # a publish cut short puts the older checkpoint back first
        return files.latest_tag(root), files.by_write_order(root)

    named, candidates = from_rank_0(look)
    problems = []
    for tag in dict.fromkeys(([named] if named else []) + candidates):
        if not (problem := _problem(root, tag, method)):
            if tag == named:
                return root, tag, None
            why = f"{named} is not a whole checkpoint ({problems[0]})" if named else f"{root} has no '{files.LATEST}'"
            return root, tag, f"resume: {why}; resuming from {tag}, the newest verified one"
        problems.append(problem)
    if not problems:
        raise ConfigError(f"--resume: no checkpoint in {root}: train with --save_steps first, or drop --resume")
    raise ConfigError(f"--resume: no whole checkpoint in {root} ({problems[0]}): train again without --resume")


def _problem(root: Path, tag: str, method: str) -> str | None:
    """Why checkpoint `tag` cannot be resumed from (missing, incomplete or corrupt) on any rank, or None; the
    same answer on every rank. A checkpoint of another method or of an older speft-ds is refused outright
    (a ConfigError on every rank)."""
    refusal, problem = zip(*on_every_rank(_local_problem(root, tag, method)))
    if any(refusal):
        raise ConfigError(next(r for r in refusal if r))
    return next((p for p in problem if p), None) or _hash_problem(root / tag)


def _local_problem(root: Path, tag: str, method: str) -> tuple[str | None, str | None]:
    """(why the checkpoint is refused outright, why it is not whole by its sizes), as this rank sees it."""
    directory = root / tag
    try:
        with safe_open(str(directory / STATE_FILE), framework="pt") as handle:
            metadata = handle.metadata()
    except Exception:  # missing, truncated or overwritten: the manifest's check names what
        metadata = None
    if metadata is not None:
        if ENGINE not in metadata or not (directory / files.MANIFEST).is_file():
            how = "in DeepSpeed's pickled files" if ENGINE not in metadata else "without a manifest of its files"
            return (f"--resume: {directory} was written by an older speft-ds, {how}: resume it with the speft-ds "
                    "that wrote it, or train again"), None
        written_by = metadata.get("method", "speft")
        if written_by != method:
            return (f"--resume: {directory} is a checkpoint of --peft {written_by}, not {method}: resume with "
                    f"--peft {written_by}"), None
    if not directory.is_dir():
        return None, f"{directory} does not exist"
    return None, files.size_problem(directory)


def _hash_problem(directory: Path) -> str | None:
    """The first file whose bytes do not match the manifest's hashes; with a process group each rank reads
    its share of the files and every rank gets the same answer."""
    names = sorted(files.read_manifest(directory)["files"])
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    return next((p for p in on_every_rank(files.hash_problem(directory, names[rank::world])) if p), None)


def read_state(root: Path, tag: str) -> ResumePoint:
    """The recipe's whole state (safetensors: nothing unpickled); the ranks' slices stay on disk."""
    with safe_open(str(root / tag / STATE_FILE), framework="pt") as handle:
        metadata = {key: json.loads(value) if key not in ("step", "method") else value
                    for key, value in handle.metadata().items()}
        # copies: safetensors' tensors map the file, which would stay open (and on NFS undeletable) all run
        tensors = {key: handle.get_tensor(key).clone() for key in handle.keys()}
    step, method, engine = int(metadata.pop("step")), metadata.pop("method"), metadata.pop(ENGINE)
    return ResumePoint(step, method, tensors, metadata, engine, root / tag, files.read_manifest(root / tag)["ranges"])


def load_engine_state(engine, point: ResumePoint) -> None:
    """Restore the trained values and AdamW moments (each rank reading the slices it holds now), the
    optimizer's step, its parameter groups' settings (rate, betas, eps, weight decay) and loss scale, the LR
    schedule, and the RNG states (host and accelerator: LoRA's dropout draws from the accelerator's); then
    let go of the rank files."""
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
    for group, settings in zip(engine.optimizer.param_groups, saved["param_groups"]):
        group.update({key: tuple(value) if key == "betas" else value for key, value in settings.items()})
    engine.global_steps = point.step
    engine.global_samples = point.step * engine.train_batch_size()
    same = saved["layout"]["world_size"] == dist.get_world_size()
    handle = point.rank_file(dist.get_rank() if same else 0)
    torch.set_rng_state(handle.get_tensor("rng/torch"))
    get_accelerator().set_rng_state(handle.get_tensor("rng/accelerator"))
    point.close()
