"""What a resume must keep of the run it continues, checked flag by flag before the model loads.

A checkpoint records the run's settings (`run_settings`). A resume is refused, in one line naming the flag,
where this run would train on other data or in another order (the seed, the dataset's contents and the flags
that read it, the held-out split, packing), would need another trained state (the method and its size
flags) or would choose a mask still to come otherwise (the salience flags, mask updates, RoSA's switch); the
optimizer's betas, eps and weight decay come from the checkpoint, with a line saying so where this run's flags
differ; the batch layout is kept as `keep_checkpoint_batches` says.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path

from safetensors import safe_open

from ..config import ConfigError, TrainConfig
from .checkpoint import ENGINE, STATE_FILE
from .distributed import from_rank_0

# the settings that change the data or their order, and those that change the trained state (the base model's
# config and the targeted modules by name, whatever the flags that chose them)
DATA_FLAGS = ("seed", "dataset", "dataset_weights", "text_field", "prompt_field", "response_field", "messages_field",
              "chat_template", "seq_len", "val_size", "packing")
SHAPE_FLAGS = ("model", "peft", "density", "num_trainable", "lora_r", "lora_alpha", "target_modules", "delta_scaling",
               "quantize")
# the settings that choose a mask still to be chosen (RoSA's at its switch, SPEFT's at each mask update)
MASK_FLAGS = ("metric", "calibration_examples", "fisher_text", "selection", "random_fraction", "input_channel_cap",
              "mask_update_steps", "mask_update", "regrow_fraction", "rosa_start")
OPTIMIZER_SETTINGS = ("betas", "eps", "weight_decay")
RUN = "run"  # the checkpoint's metadata key of the run's settings


def dataset_identity(config: TrainConfig) -> str:
    """Every --dataset's identity, comma-separated (computed on rank 0 only): a local file's or folder's
    content hash (sha256 of its bytes; a folder's files in name order, each with its name), a hub dataset's
    name."""
    return from_rank_0(lambda: ",".join(_source_identity(Path(source)) for source in config.datasets))


def _source_identity(path: Path) -> str:
    if not path.exists():
        return str(path)  # a hub name
    hashed = hashlib.sha256()
    files = sorted(f for f in path.rglob("*") if f.is_file()) if path.is_dir() else [path]
    for file in files:
        if path.is_dir():
            hashed.update(str(file.relative_to(path)).encode() + b"\0")
        with open(file, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 24), b""):
                hashed.update(block)
    return f"sha256:{hashed.hexdigest()}"


def run_settings(config: TrainConfig, ds_config: dict, base_config_hash: str, targets: list[str]) -> dict:
    """The settings a resume must keep or takes from the checkpoint (the DeepSpeed config's optimizer
    params, "auto" filled); the base model by its config's hash, the targets by name."""
    params = ds_config.get("optimizer", {}).get("params", {})
    settings = {flag: getattr(config, flag) for flag in (*DATA_FLAGS, *SHAPE_FLAGS, *MASK_FLAGS)}
    settings.update(dataset=dataset_identity(config), model=base_config_hash, target_modules=targets)
    settings.update({key: params[key] for key in OPTIMIZER_SETTINGS if key in params})
    return json.loads(json.dumps(settings))  # as the checkpoint's JSON holds them (tuples as lists)


def compare_with_checkpoint(saved: dict, now: dict) -> str | None:
    """Refuse a resume whose data or trained state would differ (a ConfigError naming the flag); return the
    line saying which optimizer settings the checkpoint's replace, or None."""
    for flags, what in ((DATA_FLAGS, "the data or their order"), (SHAPE_FLAGS, "the trained state"),
                        (MASK_FLAGS, "how a mask still to come is chosen")):
        for flag in flags:
            if flag in saved and saved[flag] != now[flag]:
                shown = SUMMARIES.get(flag) if flag != "dataset" or looks_like_hash(saved[flag]) else None
                shown = shown or f"it was {saved[flag]!r}, this run has {now[flag]!r}"
                raise ConfigError(f"--resume: --{flag} differs from the checkpoint's run ({shown}), which would "
                                  f"change {what}: resume with the first run's --{flag}, or train anew in another "
                                  "--output_dir")
    differ = [key for key in OPTIMIZER_SETTINGS if key in saved and key in now and saved[key] != now[key]]
    if not differ:
        return None
    return ("resume: " + ", ".join(f"{key} {saved[key]}" for key in differ) + " restored from the checkpoint (this "
            "run's flags ask " + ", ".join(f"{key} {now[key]}" for key in differ) + ")")


def with_saved_optimizer(config: TrainConfig, ds_config: dict, settings: dict,
                         saved: dict) -> tuple[TrainConfig, dict, dict]:
    """The config, DeepSpeed config and run settings with the checkpoint's betas, eps and weight decay, so that
    every engine of the resumed run (a mask update builds a new one) trains with them and every record of
    the run (run_config.yaml, the adapter's) says so."""
    kept = {key: saved[key] for key in OPTIMIZER_SETTINGS if key in saved}
    optimizer = ds_config.get("optimizer", {})
    if not optimizer:
        return config, ds_config, settings
    params = {**optimizer.get("params", {}), **kept}
    if "weight_decay" in kept:
        config = replace(config, weight_decay=kept["weight_decay"])
    return config, {**ds_config, "optimizer": {**optimizer, "params": params}}, {**settings, **kept}


# How a difference is said where the values themselves would not help the reader.
SUMMARIES = {"dataset": "its contents differ", "model": "the base model's config differs",
             "target_modules": "it targets other modules"}


def looks_like_hash(identity) -> bool:
    return isinstance(identity, str) and identity.startswith("sha256:")


def saved_metadata(directory: Path, key: str):
    """A JSON value of a checkpoint's state file metadata (None where it has none)."""
    with safe_open(str(directory / STATE_FILE), framework="pt") as handle:
        value = handle.metadata().get(key)
    return None if value is None else json.loads(value)


def batch_layout(root: Path, tag: str) -> dict:
    """The checkpoint's world_size, micro_batch_size and gradient_accumulation_steps."""
    return saved_metadata(root / tag, ENGINE)["layout"]


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
