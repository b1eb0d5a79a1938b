"""DeepSpeed JSON configs: checked early, "auto" values filled from the CLI the way HF Trainer does."""

from __future__ import annotations

import copy
from dataclasses import replace

import torch

from ..config import ConfigError, TrainConfig, read_json

# ds_config key path -> TrainConfig field it mirrors (HF Trainer's pairs).
_MIRRORED = {
    ("train_micro_batch_size_per_gpu",): "micro_batch_size",
    ("gradient_accumulation_steps",): "gradient_accumulation_steps",
    ("gradient_clipping",): "max_grad_norm",
    ("optimizer", "params", "lr"): "learning_rate",
    ("optimizer", "params", "weight_decay"): "weight_decay",
    ("optimizer", "params", "eps"): "adam_epsilon",
    ("scheduler", "params", "warmup_max_lr"): "learning_rate",
    ("scheduler", "params", "warmup_num_steps"): "warmup_steps",
}


def read_ds_config(path: str) -> dict:
    ds = read_json(path, "--ds_config")
    if not isinstance(ds, dict) or not isinstance(ds.get("zero_optimization", {}), dict):
        raise ConfigError(f"--ds_config {path} is not a DeepSpeed config (a JSON object with a "
                          '"zero_optimization" object): fix the file')
    stage = ds.get("zero_optimization", {}).get("stage")
    if stage != 3:
        raise ConfigError(f"--ds_config {path} uses ZeRO stage {stage}: speft-ds needs "
                          '"zero_optimization": {"stage": 3}')
    return ds


def _get(ds: dict, path: tuple):
    node = ds
    for key in path:
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


def _set(ds: dict, path: tuple, value) -> None:
    node = ds
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value


def refuse_fp16_on_cpu(config: TrainConfig, accelerator_name: str) -> None:
    if config.fp16 and accelerator_name == "cpu":
        raise ConfigError("--fp16 (or fp16.enabled in --ds_config): the CPU accelerator has no fp16 mixed precision: "
                          "drop it (--bf16 true trains in bf16 on CPU)")


def resolve_bf16(config: TrainConfig, accelerator_name: str, bf16_supported: bool) -> bool:
    refuse_fp16_on_cpu(config, accelerator_name)
    if config.bf16 == "auto":
        return accelerator_name != "cpu" and bf16_supported and not config.fp16
    return config.bf16 == "true"


def compute_dtype(config: TrainConfig, bf16: bool) -> torch.dtype:
    """The dtype the model computes in: bf16 or fp16 mixed precision, else fp32."""
    return torch.float16 if config.fp16 else torch.bfloat16 if bf16 else torch.float32


def reconcile(ds: dict, config: TrainConfig, explicit: set[str], bf16: bool) -> tuple[TrainConfig, bool]:
    """The config (and bf16 choice) after the ds_config's concrete values are applied.

    A concrete ds_config value that disagrees with a flag the user passed is an error, as in HF.
    """
    updates = {}
    for path, name in _MIRRORED.items():
        value = _get(ds, path)
        if value is None or value == "auto":
            continue
        if name in explicit and value != getattr(config, name):
            raise ConfigError(f"--{name} {getattr(config, name)} disagrees with {'.'.join(path)}={value} in "
                              f"--ds_config: set it to \"auto\" or drop the flag")
        updates[name] = value
    betas = _get(ds, ("optimizer", "params", "betas"))
    if betas not in (None, "auto"):
        if {"adam_beta1", "adam_beta2"} & explicit and list(betas) != [config.adam_beta1, config.adam_beta2]:
            raise ConfigError(f"--adam_beta1/--adam_beta2 ({config.adam_beta1}, {config.adam_beta2}) disagree with "
                              f"optimizer.params.betas={list(betas)} in --ds_config: set it to \"auto\" or drop the "
                              "flags")
        updates.update(adam_beta1=betas[0], adam_beta2=betas[1])
    if "scheduler" in ds and "lr_scheduler" in explicit:
        raise ConfigError("--lr_scheduler cannot apply: --ds_config has its own \"scheduler\" block; remove "
                          "the block or the flag")
    ds_bf16 = _get(ds, ("bf16", "enabled"))
    if ds_bf16 not in (None, "auto"):
        if "bf16" in explicit and ds_bf16 != bf16:
            raise ConfigError(f"--bf16 {config.bf16} disagrees with bf16.enabled={ds_bf16} in --ds_config: "
                              "set it to \"auto\" or drop the flag")
        bf16 = ds_bf16
    ds_fp16 = _get(ds, ("fp16", "enabled"))
    fp16 = ds_fp16 if ds_fp16 not in (None, "auto") else config.fp16
    if ("fp16" in explicit and fp16 != config.fp16) or (fp16 and bf16 and (ds_bf16 is True or "bf16" in explicit)):
        raise ConfigError(f"--fp16 {config.fp16} and --bf16 {config.bf16} disagree with --ds_config (bf16.enabled="
                          f"{ds_bf16}, fp16.enabled={ds_fp16}): one precision at a time; set them to \"auto\" or drop "
                          "the flag")
    if fp16 and bf16:  # a concrete fp16 in the JSON, bf16 left to auto on both sides: fp16 it is
        bf16 = False
    return replace(config, fp16=fp16, **updates), bf16


def auto_prefetch_bucket_size(hidden_size: int) -> int:
    """HF's value for "auto" stage3_prefetch_bucket_size."""
    return int(0.9 * hidden_size * hidden_size)


def fill_auto(ds: dict, config: TrainConfig, *, world_size: int, hidden_size: int, total_steps: int,
              bf16: bool) -> dict:
    """A copy of the ds_config with every "auto" filled from the (reconciled) config."""
    ds = copy.deepcopy(ds)
    for path, name in _MIRRORED.items():
        if _get(ds, path) == "auto":
            _set(ds, path, getattr(config, name))
    if _get(ds, ("optimizer", "params", "betas")) == "auto":  # HF's own ZeRO-3 JSON says so
        _set(ds, ("optimizer", "params", "betas"), [config.adam_beta1, config.adam_beta2])
    global_batch = config.micro_batch_size * config.gradient_accumulation_steps * world_size
    if ds.get("train_batch_size", "auto") == "auto":
        ds["train_batch_size"] = global_batch
    elif ds["train_batch_size"] != global_batch:
        raise ConfigError(f"train_batch_size={ds['train_batch_size']} in --ds_config is not micro_batch_size x "
                          f"gradient_accumulation_steps x world size ({global_batch}): set it to \"auto\"")
    if config.fp16 and "fp16" not in ds:
        ds["fp16"] = {"enabled": "auto"}  # DeepSpeed's dynamic loss scaling, its defaults
    for section, enabled in (("bf16", bf16), ("fp16", config.fp16)):
        if _get(ds, (section, "enabled")) == "auto":
            ds[section]["enabled"] = enabled
    scheduler_params = _get(ds, ("scheduler", "params")) or {}
    for key, value in (("total_num_steps", total_steps), ("warmup_min_lr", 0.0)):
        if scheduler_params.get(key) == "auto":
            scheduler_params[key] = value
    zero = ds["zero_optimization"]
    for key, value in (("reduce_bucket_size", hidden_size * hidden_size),
                       ("stage3_prefetch_bucket_size", auto_prefetch_bucket_size(hidden_size)),
                       # 0, not HF's 10 x hidden: the per-layer delta values are small parameters, and
                       # anything under the threshold would be kept whole on every rank.
                       ("stage3_param_persistence_threshold", 0)):
        if zero.get(key) == "auto":
            zero[key] = value
    leftover = [key for key, value in _walk(ds) if value == "auto"]
    if leftover:
        raise ConfigError(f"--ds_config has \"auto\" values speft-ds cannot fill ({', '.join(leftover)}): "
                          "give them concrete values")
    return ds


def _walk(node, prefix=""):
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _walk(value, f"{prefix}{key}.")
    else:
        yield prefix.rstrip("."), node


def salience_ds_config(ds: dict) -> dict:
    """The config for the salience pass: no optimizer or scheduler, every weight partitioned (none kept
    whole as 'persistent'), so each rank's shard is the only copy and metrics may modify it in place, and
    no gathered weight kept for reuse: a pass in groups runs the blocks below its group forward only, and
    ZeRO-3, following the trace of an earlier pass, would keep their weights for a backward that never
    comes (seen: the lower blocks of a small model left gathered after the pass)."""
    ds = {key: value for key, value in ds.items() if key not in ("optimizer", "scheduler")}
    ds["zero_optimization"] = {**ds["zero_optimization"], "stage3_param_persistence_threshold": 0,
                               "stage3_max_reuse_distance": 0}
    return ds
