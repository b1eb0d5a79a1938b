"""The recipe, top to bottom, for every method: check -> load -> prepare (SPEFT: salience and selection) ->
inject -> train -> eval -> save. The method (speft_ds.methods) is reached only through its interface."""

from __future__ import annotations

import logging
import math
import time
import warnings
from dataclasses import asdict, dataclass, replace
from itertools import count
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator
from tqdm import tqdm
from transformers import get_scheduler

from . import methods
from .cli import record_resume, write_run_config
from .config import ConfigError, TrainConfig, TrainingError, tracker_names
from .data.batches import collate, model_inputs, pack, pad_token_id, rank_batches, train_micro_batches
from .data.losses import causal_lm_loss_sum
from .data.retention import retention_rows, score_retention
from .data.sources import training_and_eval_sets
from .data.task_eval import Task, evaluate_task, load_task
from .methods.adapter_files import base_config_hash
from .methods.base import Method, RunContext
from .models.gguf import resolve_model
from .models.loading import check_backends, find_targets, load_model, load_model_config, load_tokenizer, skeleton_model
from .runtime import checkpoint, resume_checks, zero3
from .runtime.distributed import (block_memory, device, init_distributed, leave_process_group, naming_lost_ranks,
                                  release_freed_memory, sum_over_ranks)
from .runtime.ds_config import (compute_dtype, fill_auto, read_ds_config, reconcile, refuse_fp16_on_cpu,
                                resolve_bf16)
from .runtime.launch_env import world_size_from_env
from .runtime.metrics_log import MetricsLog, log_memory
from .runtime.shared_storage import check_shared_output_dir
from .runtime.run_summary import summary
from .runtime.trackers import Trackers

RUN_CONFIG = "run_config.yaml"  # the resolved flags, rerunnable with --config


@dataclass
class Plan:
    """Everything decided before the first heavy step."""
    config: TrainConfig
    ds_config: dict
    bf16: bool
    method: Method
    target_shapes: dict[str, tuple[int, int]]  # targeted layer name -> weight shape, in model order
    resume_from: tuple | None  # (checkpoint root, tag)
    base_config_hash: str
    total_steps: int
    eval_task: Task | None
    tokenizer: object
    train_set: object
    eval_set: object  # None: no eval loss (--val_size 0 without --eval_dataset)
    retention_rows: list | None  # --retention_text cut into rows
    resume_notes: list[str]  # what a resume took from the checkpoint or changed, for rank 0 to print
    run_settings: dict | None  # what a resume of this run must keep (saved in every checkpoint)


@dataclass
class RunResult:
    """What a finished run leaves in memory: the engine over the trained model and the method that shaped it."""
    engine: object
    method: Method
    hf_ds_config: object  # keeps transformers aware of ZeRO-3 while the model is in use


def _check_output_dir(config: TrainConfig) -> None:
    out = Path(config.output_dir)
    # Resuming continues the run's own metrics.jsonl; anything else there must not be overwritten.
    kept = (out / "adapter",) if config.resume else (out / "adapter", out / "metrics.jsonl")
    existing = [p.name for p in kept if p.exists()]
    if existing and not config.overwrite_output_dir:
        interrupted = not config.resume and (out / "checkpoints" / "latest").is_file() and not (out / "adapter").exists()
        if interrupted:
            raise ConfigError(f"--output_dir {out} holds a run that stopped before its end (checkpoints up to "
                              f"{(out / 'checkpoints' / 'latest').read_text().strip()}): pass --resume to continue "
                              "it, or another --output_dir (or --overwrite_output_dir) to start anew")
        raise ConfigError(f"--output_dir {out} already holds {', '.join(existing)}: choose another directory "
                          "or pass --overwrite_output_dir")


def plan_run(config: TrainConfig, explicit: set[str]) -> Plan:
    """Check the whole job (configs, model shape, targets, data, task, the checkpoint to resume) without
    loading weights or forming a group (where a group exists, a resume's hash check splits the files among
    the ranks). A .gguf model is converted into a directory first (once), which the run then loads."""
    ds_config = read_ds_config(config.ds_config)
    eval_task = load_task(config.eval_task_file) if config.eval_task_file else None
    config = replace(config, model=resolve_model(config.model))
    model_config = load_model_config(config)
    skeleton = skeleton_model(model_config, config.trust_remote_code)
    targets = find_targets(skeleton, config.target_modules)
    target_shapes = {name: tuple(m.weight.shape) for name, m in targets.items()}
    _check_output_dir(config)
    resume_from, resume_notes = None, []
    if config.resume:
        root, tag, note = checkpoint.find(config.output_dir, config.resume, config.peft)
        resume_from, resume_notes = (root, tag), [note] if note else []

    accelerator = get_accelerator()
    check_backends(config, accelerator.device_name())
    bf16 = resolve_bf16(config, accelerator.device_name(), accelerator.is_bf16_supported())
    config, bf16 = reconcile(ds_config, config, explicit, bf16)
    refuse_fp16_on_cpu(config, accelerator.device_name())  # the JSON's own fp16 too
    world_size = world_size_from_env()
    method_class = methods.get(config.peft)
    if resume_from:
        config, ds_config, note = resume_checks.keep_checkpoint_batches(
            config, ds_config, resume_checks.batch_layout(*resume_from), world_size,
            method_class.randomness_per_micro_batch(config) + resume_checks.model_dropout(model_config))
        resume_notes += [note] if note else []
    method = method_class(config)
    # the memory plan counts two-byte weights and activations for either half precision
    method.plan(model_config, skeleton, target_shapes, ds_config, world_size, bf16 or config.fp16, accelerator)

    tokenizer = load_tokenizer(config)
    train_set, eval_set = training_and_eval_sets(config, tokenizer)
    if config.packing:  # each split on its own, so no held-out text shares a row with training text
        train_set = pack(train_set, config.seq_len)
        eval_set = pack(eval_set, config.seq_len) if eval_set is not None else None
    retention = retention_rows(config.retention_text, tokenizer, config.seq_len) if config.retention_text else None
    steps_per_epoch = len(train_set) // (config.micro_batch_size * world_size) // config.gradient_accumulation_steps
    if steps_per_epoch == 0:
        raise ConfigError(f"{len(train_set)} training examples make no full step of micro_batch_size x "
                          f"gradient_accumulation_steps x {world_size} ranks: use a smaller batch or more data")
    total_steps = config.max_steps if config.max_steps > 0 else max(1, int(config.epochs * steps_per_epoch))
    method.check_run_length(total_steps)
    config = _warmup(config, total_steps)
    ds_config = fill_auto(ds_config, config, world_size=world_size, hidden_size=model_config.hidden_size,
                          total_steps=total_steps, bf16=bf16)
    settings = (resume_checks.run_settings(config, ds_config, base_config_hash(model_config), list(target_shapes))
                if config.save_steps or resume_from else None)
    saved = resume_checks.saved_metadata(resume_from[0] / resume_from[1], resume_checks.RUN) if resume_from else None
    if saved:
        note = resume_checks.compare_with_checkpoint(saved, settings)
        resume_notes += [note] if note else []
        config, ds_config, settings = resume_checks.with_saved_optimizer(config, ds_config, settings, saved)
    return Plan(config, ds_config, bf16, method, target_shapes, resume_from, base_config_hash(model_config),
                total_steps, eval_task, tokenizer, train_set, eval_set, retention, resume_notes, settings)


def _warmup(config: TrainConfig, total_steps: int) -> TrainConfig:
    """--warmup_ratio as steps (rounded up, as HF Trainer does); a warm-up longer than the run refused."""
    if config.warmup_ratio:
        config = replace(config, warmup_steps=math.ceil(config.warmup_ratio * total_steps))
    if config.warmup_steps > total_steps:
        raise ConfigError(f"--warmup_steps {config.warmup_steps} is longer than the run ({total_steps} steps): lower "
                          "it, or give the warm-up as a fraction with --warmup_ratio")
    return config


def micro_batch_stream(plan: Plan, rank: int, world_size: int):
    for epoch in count():
        yield from train_micro_batches(len(plan.train_set), epoch, plan.config.seed, rank, world_size,
                                       plan.config.micro_batch_size, plan.config.gradient_accumulation_steps)


def _on_device(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {key: value.to(device()) for key, value in batch.items()}


def _mean_over_ranks(value: float) -> float:
    return sum_over_ranks(value) / dist.get_world_size()


def _stop_unless_finite(loss: float, step: int, plan: Plan) -> None:
    bad = torch.tensor(float(not math.isfinite(loss)), device=device())
    dist.all_reduce(bad)  # every rank stops at the same step
    if bad.item():
        kept = checkpoint.checkpoint_root(plan.config.output_dir)
        raise TrainingError(f"the loss is not finite at step {step}: lower --learning_rate or check the data; "
                            f"no checkpoint is written after this point (the last good one, if any, is in {kept})")


def train_steps(engine, plan: Plan, stream, steps: range, log: MetricsLog, progress: tqdm, after_step) -> None:
    """Optimizer steps `steps` (numbered from 1), drawing micro-batches from `stream`, with the method's hooks
    around each step; `after_step(step)` runs after each but the last (the caller handles the end of the
    range)."""
    config, pad_id, method = plan.config, pad_token_id(plan.tokenizer), plan.method
    losses, times = [], []
    engine.train()
    for step in steps:
        lr = engine.get_lr()[0]
        started = time.perf_counter()
        step_loss = 0.0
        for _ in range(config.gradient_accumulation_steps):
            batch = _on_device(collate([plan.train_set[i] for i in next(stream)], pad_id))
            logits = engine(**model_inputs(batch), use_cache=False).logits
            loss_sum, tokens = causal_lm_loss_sum(logits, batch["labels"])
            loss = loss_sum / max(tokens, 1)
            engine.backward(loss)
            if engine.is_gradient_accumulation_boundary():
                method.after_backward(engine, step)
            engine.step()
            step_loss += loss.item() / config.gradient_accumulation_steps
            del logits, loss
            release_freed_memory()
        method.after_step(engine, step)
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
        logits = engine(**model_inputs(batch), use_cache=False).logits
        loss_sum, tokens = causal_lm_loss_sum(logits, batch["labels"])
        totals += torch.tensor([loss_sum.item(), tokens], dtype=torch.float64, device=device())
    dist.all_reduce(totals)
    return (totals[0] / totals[1].clamp(min=1)).item()


def training_engine(model, params: list, plan: Plan, completed_steps: int):
    """A DeepSpeed engine training only `params` (the method's trainable parameters); the LR schedule resumes
    at `completed_steps`."""
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


def score_task(engine, plan: Plan, log: MetricsLog, step: int, when: str) -> dict:
    """Task accuracy of the model as it is now (every rank takes part), as one metrics record."""
    result = evaluate_task(engine.module, plan.tokenizer, plan.eval_task, show_progress=dist.get_rank() == 0)
    record = {"event": "task_eval", "task": result.task, "step": step, "when": when, "accuracy": result.accuracy,
              "stderr": result.stderr, "examples": result.examples}
    log.write(record)
    return record


def score_retention_text(engine, plan: Plan, log: MetricsLog, step: int, when: str, method: Method | None) -> None:
    """--retention_text's loss (and KL from the base, where `method` can switch its update off) as one
    metrics record (every rank takes part)."""
    result = score_retention(engine.module, plan.retention_rows, plan.config.micro_batch_size,
                             pad_token_id(plan.tokenizer), device(),
                             method.without_update if method else lambda: None)
    log.write({"event": "retention", "step": step, "when": when, **result})


def score_run(engine, plan: Plan, log: MetricsLog, step: int, when: str, method: Method | None) -> None:
    """Every held-out score at one point of the run ("before", "during" or "after" training; every rank takes
    part): the eval loss (not before: it is the task's loss the run learns), task accuracy and retention,
    then their wall time as one record."""
    started = time.perf_counter()
    if when != "before" and plan.eval_set is not None:
        log.write({"event": "eval", "step": step, "examples": len(plan.eval_set),
                   "eval_loss": evaluate(engine, plan, dist.get_rank(), dist.get_world_size())})
    if plan.eval_task:
        score_task(engine, plan, log, step, when)
    if plan.retention_rows:
        score_retention_text(engine, plan, log, step, when, method)
    log.write({"event": "evaluation", "step": step, "when": when, "wall_time_s": time.perf_counter() - started})


def run(plan: Plan) -> RunResult:
    config, method = plan.config, plan.method
    init_distributed(config.ddp_timeout)
    # Every rank has checked the output directory (plan_run) before rank 0 writes into it; a group formed
    # before plan_run (tests, notebooks) would otherwise let rank 0 run ahead.
    dist.barrier()
    rank, world_size = dist.get_rank(), dist.get_world_size()
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    torch.manual_seed(config.seed)
    point = checkpoint.read_state(*plan.resume_from) if plan.resume_from else None
    names = tracker_names(config.report_to)
    trackers = Trackers(names, Path(config.output_dir), asdict(config)) if rank == 0 and names else None
    log = MetricsLog(Path(config.output_dir) / "metrics.jsonl", enabled=rank == 0,
                     resume_step=point.step if point else None, sink=trackers.log if trackers else None)
    if rank == 0:
        if point:  # the first run's settings stay; the resume is recorded under them
            record_resume(config, Path(config.output_dir) / RUN_CONFIG, plan.resume_from[1], world_size)
        else:
            write_run_config(config, Path(config.output_dir) / RUN_CONFIG)
        for note in plan.resume_notes:
            print(note, flush=True)

    ctx = RunContext(plan, log, rank, world_size, start_memory=log_memory(log, "start"))
    started = time.perf_counter()
    model, hf_ds_config = load_model(config, plan.ds_config, compute_dtype(config, plan.bf16))
    log.write({"event": "load", "wall_time_s": time.perf_counter() - started})
    log_memory(log, "load")
    start = point.step if point else 0

    def make_engine(params: list, completed_steps: int):
        return training_engine(model, params, plan, completed_steps)

    if point:
        engine = make_engine(method.restore(model, ctx, point), start)
        checkpoint.load_engine_state(engine, point)
    else:
        if rank == 0 and method.describe():
            print(method.describe(), flush=True)
        method.prepare(model, ctx)
        engine = make_engine(method.inject(model, ctx), 0)
    log.write(method.trainable_record(engine))

    if config.eval_on_start and not start and (plan.eval_task or plan.retention_rows):
        score_run(engine, plan, log, 0, "before", method)

    def between_steps(step: int) -> None:  # reads the current engine
        if config.save_steps and step % config.save_steps == 0:
            with block_memory() as memory:
                saving = time.perf_counter()
                state, meta = method.checkpoint_state(engine)
                checkpoint.save(engine, config.output_dir, step, method.name, state,
                                {**meta, resume_checks.RUN: plan.run_settings}, method.checkpoint_slices(),
                                config.save_total_limit)
                saving = time.perf_counter() - saving
            log.write({"event": "checkpoint", "step": step, "wall_time_s": saving, **memory})
        if config.eval_steps and step % config.eval_steps == 0 and step < plan.total_steps:
            score_run(engine, plan, log, step, "during", method)

    stream = micro_batch_stream(plan, rank, world_size)
    for _ in range(start * config.gradient_accumulation_steps):  # the data a resumed run has already seen
        next(stream)
    every = method.update_every or plan.total_steps
    step = start
    # A context, so the bar ends its line even when training stops with an error.
    started = time.perf_counter()
    with tqdm(total=plan.total_steps, initial=start, desc="train", disable=rank != 0) as progress:
        while step < plan.total_steps:
            last = min((step // every + 1) * every, plan.total_steps)
            train_steps(engine, plan, stream, range(step + 1, last + 1), log, progress, after_step=between_steps)
            if last < plan.total_steps:
                engine = method.update(engine, model, ctx, update=last // every, completed_steps=last,
                                       make_engine=make_engine)
            between_steps(last)  # after any mask update, so a resumed run continues with the new mask
            step = last
    log.write({"event": "training", "steps": plan.total_steps - start, "wall_time_s": time.perf_counter() - started})
    log_memory(log, "training")
    score_run(engine, plan, log, plan.total_steps, "after", method)
    adapter_dir = Path(config.output_dir) / "adapter"
    with block_memory() as memory:
        started = time.perf_counter()
        method.save_adapter(engine, ctx, adapter_dir)
        if rank == 0:  # its own file: adapter_config.json stays what peft and our loaders read
            write_run_config(config, adapter_dir / RUN_CONFIG)
        saving = time.perf_counter() - started
    log.write({"event": "adapter", "wall_time_s": saving, **memory})
    log_memory(log, "eval and adapter")
    if trackers:  # before the summary, which ends the output (W&B prints its own on closing)
        trackers.close()
    if rank == 0:
        targeted = sum(rows * cols for rows, cols in plan.target_shapes.values())
        print(summary(log.records(), method.name, targeted, adapter_dir), flush=True)
    return RunResult(engine, method, hf_ds_config)


def train(config: TrainConfig, explicit: set[str]) -> int:
    """The whole job on this rank, from a checked configuration (speft_ds.train parses it). A job of several
    ranks that saves or resumes forms its group first and checks that every rank sees --output_dir, so that a
    resume's checks (checkpoint.find) read the same checkpoint everywhere, each rank its share."""
    with naming_lost_ranks():
        if world_size_from_env() > 1 and (config.save_steps or config.resume):
            init_distributed(config.ddp_timeout)
            check_shared_output_dir(config.output_dir)
        plan = plan_run(config, explicit)
        result = run(plan)
        zero3.destroy_engine(result.engine)
        leave_process_group()
    return 0
