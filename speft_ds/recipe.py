"""The SPEFT recipe, top to bottom: check -> load -> calibrate -> select -> inject -> train -> eval -> save."""

from __future__ import annotations

import logging
import math
import time
import warnings
from dataclasses import asdict, dataclass, replace
from itertools import count
from pathlib import Path
from typing import Sequence

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator
from tqdm import tqdm
from transformers import get_scheduler

from . import checkpoint, masks, zero3
from .adapter import base_config_hash, save_adapter
from .cli import parse_config
from .config import ConfigError, TrainConfig, TrainingError
from .data import (calibration_indices, collate, load_raw_dataset, pad_token_id, rank_batches,
                   tokenize_dataset, train_eval_split, train_micro_batches)
from .distributed import (device, init_distributed, leave_process_group, memory_mib_per_rank, naming_lost_ranks,
                          per_rank, release_freed_memory, reset_peak_memory)
from .ds_config import fill_auto, read_ds_config, reconcile, resolve_bf16, salience_ds_config
from .gguf_models import resolve_model
from .launch_env import world_size_from_env
from .losses import causal_lm_loss_sum
from .metrics_log import MetricsLog
from .model import check_backends, find_targets, load_model, load_model_config, load_tokenizer, skeleton_model
from .partitioned_deltas import inject_partitioned
from .salience import score_groups
from .salience_budget import SaliencePlan, plan_salience
from .selection import gather_indices, num_to_select, select_from_groups
from .task_eval import Task, evaluate_task, load_task


@dataclass
class Plan:
    """Everything decided before the first heavy step."""
    config: TrainConfig
    ds_config: dict
    bf16: bool
    k: int
    target_shapes: dict[str, tuple[int, int]]  # targeted layer name -> weight shape, in model order
    resume_from: tuple | None  # (checkpoint root, tag)
    base_config_hash: str
    total_steps: int
    salience: SaliencePlan
    eval_task: Task | None
    tokenizer: object
    train_set: object
    eval_set: object

    @property
    def target_names(self) -> list[str]:
        return list(self.target_shapes)

    @property
    def targeted_elements(self) -> int:
        return sum(rows * cols for rows, cols in self.target_shapes.values())


@dataclass
class RunResult:
    """What a finished run leaves in memory: the engine over the trained model and its delta layers."""
    engine: object
    layers: dict
    hf_ds_config: object  # keeps transformers aware of ZeRO-3 while the model is in use


def _check_output_dir(config: TrainConfig) -> None:
    out = Path(config.output_dir)
    # Resuming continues the run's own metrics.jsonl; anything else there must not be overwritten.
    kept = (out / "adapter",) if config.resume else (out / "adapter", out / "metrics.jsonl")
    existing = [p.name for p in kept if p.exists()]
    if existing and not config.overwrite_output_dir:
        raise ConfigError(f"--output_dir {out} already holds {', '.join(existing)}: choose another directory "
                          "or pass --overwrite_output_dir")


def plan_run(config: TrainConfig, explicit: set[str]) -> Plan:
    """Check the whole job (configs, model shape, targets, data, task) without loading weights or forming a
    group. A .gguf model is converted into a directory first (once), which the run then loads."""
    ds_config = read_ds_config(config.ds_config)
    eval_task = load_task(config.eval_task_file) if config.eval_task_file else None
    config = replace(config, model=resolve_model(config.model))
    model_config = load_model_config(config)
    skeleton = skeleton_model(model_config, config.trust_remote_code)
    targets = find_targets(skeleton, config.target_modules)
    target_shapes = {name: tuple(m.weight.shape) for name, m in targets.items()}
    k = num_to_select(config.density, config.num_trainable, sum(m.weight.numel() for m in targets.values()))
    _check_output_dir(config)
    resume_from = checkpoint.find(config.output_dir, config.resume) if config.resume else None

    accelerator = get_accelerator()
    check_backends(config, accelerator.device_name())
    bf16 = resolve_bf16(config, accelerator.device_name(), accelerator.is_bf16_supported())
    config, bf16 = reconcile(ds_config, config, explicit, bf16)
    world_size = world_size_from_env()
    salience = plan_salience(config, model_config, skeleton, target_shapes, k, ds_config, world_size, bf16, accelerator)

    tokenizer = load_tokenizer(config)
    train_set, eval_set = train_eval_split(tokenize_dataset(load_raw_dataset(config), tokenizer, config),
                                           config.val_size, config.seed)
    steps_per_epoch = len(train_set) // (config.micro_batch_size * world_size) // config.gradient_accumulation_steps
    if steps_per_epoch == 0:
        raise ConfigError(f"{len(train_set)} training examples make no full step of micro_batch_size x "
                          f"gradient_accumulation_steps x {world_size} ranks: use a smaller batch or more data")
    total_steps = config.max_steps if config.max_steps > 0 else max(1, int(config.epochs * steps_per_epoch))
    ds_config = fill_auto(ds_config, config, world_size=world_size, hidden_size=model_config.hidden_size,
                          total_steps=total_steps, bf16=bf16)
    return Plan(config, ds_config, bf16, k, target_shapes, resume_from, base_config_hash(model_config), total_steps,
                salience, eval_task, tokenizer, train_set, eval_set)


def micro_batch_stream(plan: Plan, rank: int, world_size: int):
    for epoch in count():
        yield from train_micro_batches(len(plan.train_set), epoch, plan.config.seed, rank, world_size,
                                       plan.config.micro_batch_size)


def _on_device(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {key: value.to(device()) for key, value in batch.items()}


def _sum_over_ranks(value: float) -> float:
    tensor = torch.tensor(value, dtype=torch.float64, device=device())
    dist.all_reduce(tensor)
    return tensor.item()


def _mean_over_ranks(value: float) -> float:
    return _sum_over_ranks(value) / dist.get_world_size()


def _stop_unless_finite(loss: float, step: int, plan: Plan) -> None:
    bad = torch.tensor(float(not math.isfinite(loss)), device=device())
    dist.all_reduce(bad)  # every rank stops at the same step
    if bad.item():
        kept = checkpoint.checkpoint_root(plan.config.output_dir)
        raise TrainingError(f"the loss is not finite at step {step}: lower --learning_rate or check the data; "
                            f"no checkpoint is written after this point (the last good one, if any, is in {kept})")


def train_steps(engine, plan: Plan, stream, steps: range, log: MetricsLog, progress: tqdm, after_step) -> None:
    """Optimizer steps `steps` (numbered from 1), drawing micro-batches from `stream`; `after_step(step)` runs
    after each but the last (the caller handles the end of the range)."""
    config, pad_id = plan.config, pad_token_id(plan.tokenizer)
    losses, times = [], []
    engine.train()
    for step in steps:
        lr = engine.get_lr()[0]
        started = time.perf_counter()
        step_loss = 0.0
        for _ in range(config.gradient_accumulation_steps):
            batch = _on_device(collate([plan.train_set[i] for i in next(stream)], pad_id))
            logits = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
            loss_sum, tokens = causal_lm_loss_sum(logits, batch["labels"])
            loss = loss_sum / max(tokens, 1)
            engine.backward(loss)
            engine.step()
            step_loss += loss.item() / config.gradient_accumulation_steps
            del logits, loss
            release_freed_memory()
        _stop_unless_finite(step_loss, step, plan)
        losses.append(step_loss)
        times.append(time.perf_counter() - started)
        progress.update()
        if step % config.logging_steps == 0 or step == steps[-1]:
            mean_loss = _mean_over_ranks(sum(losses) / len(losses))  # a collective: every rank calls it
            log.write({"step": step, "loss": mean_loss, "lr": lr, "step_time_s": sum(times) / len(times)})
            losses, times = [], []
        if step != steps[-1]:
            after_step(step)


@torch.no_grad()
def evaluate(engine, plan: Plan, rank: int, world_size: int) -> float:
    batches = rank_batches(plan.eval_set, list(range(len(plan.eval_set))), rank, world_size,
                           plan.config.micro_batch_size, pad_token_id(plan.tokenizer))
    engine.eval()
    totals = torch.zeros(2, dtype=torch.float64, device=device())
    for batch in map(_on_device, batches):
        logits = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        loss_sum, tokens = causal_lm_loss_sum(logits, batch["labels"])
        totals += torch.tensor([loss_sum.item(), tokens], dtype=torch.float64, device=device())
    dist.all_reduce(totals)
    return (totals[0] / totals[1].clamp(min=1)).item()


def _targets(model, plan: Plan) -> dict:
    """The targeted layers by their original names (the base layer where a sparse-delta layer wraps one)."""
    return {name: getattr(model.get_submodule(name), "base_layer", model.get_submodule(name))
            for name in plan.target_names}


def select_masks(engine, plan: Plan, log: MetricsLog, rank: int, world_size: int, calibration_round: int = 0,
                 k: int | None = None, excluded: dict[str, torch.Tensor] | None = None) -> tuple[dict, dict]:
    """Salience over calibration subset number `calibration_round` (0: the first mask), one group of
    weights at a time as plan.salience says, each group merged into the selection before the next is
    scored. Returns the flat indices selected in this rank's shard of each weight, and a summary of the
    scores. `k` and `excluded` (entries that cannot be selected) serve drop_regrow, whose top-k is global."""
    config = plan.config
    calibration = calibration_indices(len(plan.train_set), config.calibration_examples,
                                      config.seed + calibration_round)
    batches = rank_batches(plan.train_set, calibration, rank, world_size, config.micro_batch_size,
                           pad_token_id(plan.tokenizer))
    local = config.selection == "local" and excluded is None
    normalize = config.selection == "normalized"
    started = time.perf_counter()
    model = engine.module
    groups = score_groups(model, _targets(model, plan), plan.salience.groups, batches, config.metric, seed=config.seed,
                          show_progress=rank == 0, offload=plan.salience.offload, release=engine.empty_partition_cache)
    selected, summary, selecting = select_from_groups(groups, plan.target_names, k=None if local else k or plan.k,
                                                      density=config.density, excluded=excluded,
                                                      normalize=normalize)
    log.write({"event": "salience", "metric": config.metric, "examples": len(calibration),
               "chunks": len(plan.salience.groups), "offload": plan.salience.offload,
               "wall_time_s": time.perf_counter() - started - selecting})
    count = int(_sum_over_ranks(sum(t.numel() for t in selected.values())))
    log.write({"event": "selection", "selection": "local" if local else "normalized" if normalize else "global",
               "k": count, "wall_time_s": selecting})
    return selected, summary


def _base_weights(layers: dict) -> dict:
    return {name: layer.base_layer.weight for name, layer in layers.items()}


def _nonempty(indices: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # A weight with no selected entry gets no delta (ZeRO-3 cannot partition an empty parameter).
    return {name: idx for name, idx in indices.items() if idx.numel() > 0}


def full_indices(engine, layers: dict, keep: bool = True) -> dict[str, torch.Tensor]:
    """Each delta layer's whole index list (int64), gathered one layer at a time (a collective on every
    rank); only kept where `keep` (rank 0 alone, to write a file)."""
    # ZeRO-3 may still be prefetching parameters for the next forward, and a gather of an in-flight
    # parameter fails: settle and release them all first.
    engine.empty_partition_cache()
    gathered = {}
    for name, layer in layers.items():
        indices = zero3.gather_full(layer.delta_indices).long()
        if keep:
            gathered[name] = indices
    return gathered


def _values(layers: dict) -> list:
    return [layer.delta_values for layer in layers.values()]


def _delta_count(layers: dict) -> int:
    return sum(zero3.full_numel(layer.delta_values) for layer in layers.values())


def training_engine(model, params: list, plan: Plan, completed_steps: int):
    """A DeepSpeed engine training only `params` (the delta values); the LR schedule resumes at
    `completed_steps`."""
    config = plan.config

    def lr_scheduler(optimizer):
        scheduler = get_scheduler(config.lr_scheduler, optimizer, num_warmup_steps=config.warmup_steps,
                                  num_training_steps=plan.total_steps)
        with warnings.catch_warnings():  # stepping the schedule alone, before any optimizer step, is the point
            warnings.simplefilter("ignore", UserWarning)
            for _ in range(completed_steps):
                scheduler.step()
        return scheduler

    engine, *_ = deepspeed.initialize(model=model, config=plan.ds_config,
                                      lr_scheduler=None if "scheduler" in plan.ds_config else lr_scheduler,
                                      model_parameters=params)
    return engine


def _inject(model, plan: Plan, indices: dict, values: dict | None = None) -> dict:
    return inject_partitioned(model, plan.ds_config, indices.items(), values, plan.config.delta_impl)


def inject_selected(model, plan: Plan, selected: dict[str, torch.Tensor]) -> dict:
    """Wrap each weight with selected entries in a delta layer partitioned across ranks: a weight's whole
    index list exists only while its layer is created, never every weight's at once."""
    return inject_partitioned(model, plan.ds_config, gather_indices(selected), impl=plan.config.delta_impl)


def _log_delta(log: MetricsLog, layers: dict) -> None:
    """The trainable count, and what each rank keeps of the delta parameters (a collective)."""
    held = per_rank([sum(zero3.resident_bytes(layer.delta_indices) for layer in layers.values()),
                     sum(zero3.resident_bytes(layer.delta_values) for layer in layers.values())])
    log.write({"event": "delta", "k": _delta_count(layers), "index_bytes_per_rank": [int(r[0]) for r in held],
               "value_bytes_per_rank": [int(r[1]) for r in held]})


def reselect(engine, model, layers: dict, folded: masks.FoldedDeltas, plan: Plan, log: MetricsLog,
             rank: int, world_size: int, update: int, completed_steps: int):
    """The paper's dynamic mask: fold every delta into W, select k anew on fresh calibration data, and
    train new zero deltas with a fresh optimizer."""
    indices = full_indices(engine, layers)
    values = {name: zero3.gather_full_fp32(layer.delta_values) for name, layer in layers.items()}
    engine.destroy()
    folded.fold(_base_weights(layers), indices, values)
    masks.unwrap(model, layers)
    salience_engine = deepspeed.initialize(model=model, config=salience_ds_config(plan.ds_config))[0]
    selected, summary = select_masks(salience_engine, plan, log, rank, world_size, calibration_round=update)
    salience_engine.destroy()
    layers = inject_selected(model, plan, selected)
    return training_engine(model, _values(layers), plan, completed_steps), layers, summary


def drop_regrow(engine, model, layers: dict, folded: masks.FoldedDeltas, plan: Plan,
                log: MetricsLog, rank: int, world_size: int, update: int, completed_steps: int):
    """Fold the regrow_fraction of entries with the smallest |value| into W and regrow as many by salience
    among unselected entries; kept entries keep values and AdamW moments, grown ones start from zero."""
    indices = full_indices(engine, layers)
    k = sum(t.numel() for t in indices.values())
    n_swap = max(1, round(plan.config.regrow_fraction * k))
    kept_state = {name: {"value": zero3.gather_full_fp32(layer.delta_values), **zero3.adam_moments(layer.delta_values)}
                  for name, layer in layers.items()}
    step = zero3.adam_step(engine)
    engine.destroy()

    keep = masks.largest_magnitudes({name: s["value"] for name, s in kept_state.items()}, k - n_swap)
    for name in layers:
        dropped = torch.ones(indices[name].numel(), dtype=torch.bool)
        dropped[keep[name]] = False
        folded.fold(_base_weights(layers), {name: indices[name][dropped]}, {name: kept_state[name]["value"][dropped]})
    masks.unwrap(model, layers)
    kept = _nonempty({name: indices[name][keep[name]] for name in layers})
    kept_state = {name: {key: t[keep[name]] for key, t in kept_state[name].items()} for name in kept}

    # Score the model as it now is (W with the dropped entries folded in, plus the kept deltas, frozen).
    layers = _inject(model, plan, kept, {name: s["value"] for name, s in kept_state.items()})
    for layer in layers.values():
        layer.delta_values.requires_grad_(False)
    salience_engine = deepspeed.initialize(model=model, config=salience_ds_config(plan.ds_config))[0]
    selected, summary = select_masks(salience_engine, plan, log, rank, world_size, calibration_round=update,
                                     k=n_swap, excluded=kept)
    grown = dict(gather_indices(selected))
    salience_engine.destroy()
    masks.unwrap(model, layers)

    indices, state = masks.union(plan.target_names, kept, grown, kept_state)
    layers = _inject(model, plan, indices, {name: s["value"] for name, s in state.items()})
    engine = training_engine(model, _values(layers), plan, completed_steps)
    zero3.seed_adam_state(engine, step, {layers[name].delta_values: {key: t for key, t in s.items() if key != "value"}
                                         for name, s in state.items()})
    return engine, layers, summary


MASK_UPDATES = {"reselect": reselect, "drop_regrow": drop_regrow}


def save_trained_adapter(engine, layers: dict, folded: masks.FoldedDeltas, score_summary: dict, plan: Plan,
                         rank: int) -> None:
    """Gather the partitioned indices and values (collectives) and let rank 0 write the adapter, relative
    to the original base model (deltas folded in by mask updates included)."""
    config = plan.config
    indices = full_indices(engine, layers, keep=rank == 0)
    values = {name: zero3.gather_full_fp32(layer.delta_values) for name, layer in layers.items()}
    saved = torch.ones(1, device=device())
    if rank == 0:
        trainable_k = sum(t.numel() for t in indices.values())
        indices, values = folded.total(plan.target_names, indices, values)
        k = sum(t.numel() for t in indices.values())
        meta = {"base_model_name_or_path": config.model, "base_config_hash": plan.base_config_hash,
                "metric": config.metric, "selection": config.selection,
                "density": k / plan.targeted_elements, "trainable_k": trainable_k,
                "target_modules": config.target_modules or "all-linear",
                "salience_summary": score_summary, "train_config": asdict(config)}
        shapes = {name: list(shape) for name, shape in plan.target_shapes.items() if name in indices}
        try:
            save_adapter(Path(config.output_dir) / "adapter", indices, values, shapes, meta)
        except BaseException as err:
            saved.zero_()
            dist.broadcast(saved, src=0)  # release the other ranks before raising
            if isinstance(err, Exception):  # a full disk (safetensors has its own error type), a bad path
                raise TrainingError(f"writing the adapter to {Path(config.output_dir) / 'adapter'} failed "
                                    f"({type(err).__name__}: {err}): check free space and permissions there and "
                                    "rerun; any checkpoint stays, and --resume starts from it") from err
            raise
    dist.broadcast(saved, src=0)
    if not saved.item():
        raise RuntimeError("rank 0 failed to write the adapter (its error is in rank 0's output)")


def log_memory(log: MetricsLog, phase: str) -> dict:
    """Every rank's RSS now and its peak during the phase that just ended (a collective), then a new peak."""
    record = {"event": "memory", "phase": phase, **memory_mib_per_rank()}
    log.write(record)
    reset_peak_memory()
    return record


def report_salience_memory(log: MetricsLog, salience: SaliencePlan, start: dict, after: dict, rank: int) -> None:
    """The salience phase's measured peak per rank next to the plan: the accelerator's peak allocation, or
    on CPU the peak RSS over the RSS before the model was loaded (what the planner counts)."""
    measured = after.get("device_peak_mib_per_rank") or [
        peak - before for peak, before in zip(after["peak_rss_mib_per_rank"], start["rss_mib_per_rank"])]
    gib = [round(m / 1024, 3) for m in measured]
    log.write({"event": "salience_memory", "planned_peak_gib": round(salience.planned_peak / 2**30, 3),
               "measured_peak_gib_per_rank": gib, "max_memory_gib": round(salience.budget / 2**30, 3)})
    if rank == 0:
        print(f"salience: measured peak {max(gib):.2f} GiB per rank, planned {salience.planned_peak / 2**30:.2f} GiB",
              flush=True)


def score_task(engine, plan: Plan, log: MetricsLog, step: int, when: str) -> dict:
    """Task accuracy of the model as it is now (every rank takes part), as one metrics record."""
    result = evaluate_task(engine.module, plan.tokenizer, plan.eval_task, show_progress=dist.get_rank() == 0)
    record = {"event": "task_eval", "task": result.task, "step": step, "when": when, "accuracy": result.accuracy,
              "stderr": result.stderr, "examples": result.examples}
    log.write(record)
    return record


def _accuracy(record: dict) -> str:
    return f"{record['accuracy']:.1%} ± {record['stderr']:.1%}"


def report_task_scores(scores: list[dict]) -> None:
    """One line: the task accuracy before training (where this run scored it), during, and after."""
    steps = " -> ".join(f"{_accuracy(r)} " + (f"at step {r['step']}" if r["when"] == "during" else r["when"])
                        for r in scores)
    print(f"task {scores[-1]['task']} ({scores[-1]['examples']} held-out examples): {steps}", flush=True)


def run(plan: Plan) -> RunResult:
    config = plan.config
    init_distributed(config.ddp_timeout)
    # Every rank has checked the output directory (plan_run) before rank 0 writes into it; a group formed
    # before plan_run (tests, notebooks) would otherwise let rank 0 run ahead.
    dist.barrier()
    rank, world_size = dist.get_rank(), dist.get_world_size()
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    torch.manual_seed(config.seed)
    point = checkpoint.read_state(*plan.resume_from) if plan.resume_from else None
    log = MetricsLog(Path(config.output_dir) / "metrics.jsonl", enabled=rank == 0,
                     resume_step=point.step if point else None)

    start_memory = log_memory(log, "start")
    started = time.perf_counter()
    model, hf_ds_config = load_model(config, plan.ds_config, torch.bfloat16 if plan.bf16 else torch.float32)
    log.write({"event": "load", "wall_time_s": time.perf_counter() - started})
    log_memory(log, "load")
    if point:
        folded, summary, start = point.folded, point.summary, point.step
        folded.refold({name: model.get_submodule(name).weight for name in folded.parts})
        layers = _inject(model, plan, point.indices)
        engine = training_engine(model, _values(layers), plan, completed_steps=start)
        checkpoint.load_engine_state(engine, point)
        del point  # and with it every layer's whole index list: the layers keep their partitions
    else:
        log.write(plan.salience.record())
        if rank == 0:
            print(plan.salience.describe(), flush=True)
        # No optimizer: this engine only gathers the partitioned weights around each layer's forward and backward.
        engine = deepspeed.initialize(model=model, config=salience_ds_config(plan.ds_config))[0]
        selected, summary = select_masks(engine, plan, log, rank, world_size)
        engine.destroy()
        release_freed_memory()
        folded, start = masks.FoldedDeltas(), 0
        report_salience_memory(log, plan.salience, start_memory, log_memory(log, "salience"), rank)  # and selection
        layers = inject_selected(model, plan, selected)
        del selected
        engine = training_engine(model, _values(layers), plan, completed_steps=start)
    _log_delta(log, layers)

    before = plan.eval_task and config.eval_on_start and not start
    task_scores = [score_task(engine, plan, log, 0, "before")] if before else []

    def between_steps(step: int) -> None:  # reads the current engine, masks and folds
        if config.save_steps and step % config.save_steps == 0:
            checkpoint.save(engine, config.output_dir, step, full_indices(engine, layers, keep=rank == 0), folded, summary,
                            config.save_total_limit)
        if config.eval_steps and step % config.eval_steps == 0 and step < plan.total_steps:
            log.write({"event": "eval", "step": step, "eval_loss": evaluate(engine, plan, rank, world_size),
                       "examples": len(plan.eval_set)})
            if plan.eval_task:
                task_scores.append(score_task(engine, plan, log, step, "during"))

    stream = micro_batch_stream(plan, rank, world_size)
    for _ in range(start * config.gradient_accumulation_steps):  # the data a resumed run has already seen
        next(stream)
    every = config.mask_update_steps or plan.total_steps
    step = start
    # A context, so the bar ends its line even when training stops with an error.
    with tqdm(total=plan.total_steps, initial=start, desc="train", disable=rank != 0) as progress:
        while step < plan.total_steps:
            last = min((step // every + 1) * every, plan.total_steps)
            train_steps(engine, plan, stream, range(step + 1, last + 1), log, progress, after_step=between_steps)
            if last < plan.total_steps:
                started = time.perf_counter()
                engine, layers, summary = MASK_UPDATES[config.mask_update](
                    engine, model, layers, folded, plan, log, rank, world_size, update=last // every,
                    completed_steps=last)
                log.write({"event": "mask_update", "step": last, "strategy": config.mask_update, "k": _delta_count(layers),
                           "wall_time_s": time.perf_counter() - started})
            between_steps(last)  # after any mask update, so a resumed run continues with the new mask
            step = last
    log_memory(log, "training")
    log.write({"event": "eval", "step": plan.total_steps, "eval_loss": evaluate(engine, plan, rank, world_size),
               "examples": len(plan.eval_set)})
    if plan.eval_task:
        task_scores.append(score_task(engine, plan, log, plan.total_steps, "after"))
        if rank == 0:
            report_task_scores(task_scores)
    started = time.perf_counter()
    save_trained_adapter(engine, layers, folded, summary, plan, rank)
    log.write({"event": "adapter", "wall_time_s": time.perf_counter() - started})
    log_memory(log, "eval and adapter")
    return RunResult(engine, layers, hf_ds_config)


def main(argv: Sequence[str]) -> int:
    config, explicit = parse_config(argv)
    plan = plan_run(config, explicit)
    with naming_lost_ranks():
        result = run(plan)
        result.engine.destroy()
        leave_process_group()
    return 0
