"""The flag names users bring from HF Trainer and LLaMA-Factory, as this tool's own: one table.

An alias is rewritten into the flag it stands for (its value mapped where the two tools spell values
differently) before anything is parsed, so it passes through the same type, choice and range checks; a
--config file's keys are read the same way. LIKELY holds names that are no flag of this tool but whose
meaning is plain, for suggestions only: an unknown flag is matched whole against the aliases and these
before its spelling is matched against the flags and aliases. UNNEEDED says why some have no counterpart.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .config import LR_SCHEDULES, ConfigError


@dataclass(frozen=True)
class Alias:
    flag: str                                   # this tool's flag (a TrainConfig field)
    source: str                                 # whose name it is
    values: dict = field(default_factory=dict)  # their value -> ours, where they differ
    allowed: tuple[str, ...] | None = None      # their values that map at all (None: any)


ALIASES = {
    "num_train_epochs": Alias("epochs", "HF Trainer"),
    "per_device_train_batch_size": Alias("micro_batch_size", "HF Trainer"),
    "lr_scheduler_type": Alias("lr_scheduler", "HF Trainer", allowed=LR_SCHEDULES),
    "resume_from_checkpoint": Alias("resume", "HF Trainer", {"true": "latest", "True": "latest", "false": None,
                                                            "False": None}),
    "model_name_or_path": Alias("model", "HF Trainer"),
    "deepspeed": Alias("ds_config", "HF Trainer"),
    "cutoff_len": Alias("seq_len", "LLaMA-Factory"),
    "lora_rank": Alias("lora_r", "LLaMA-Factory"),
    "lora_target": Alias("target_modules", "LLaMA-Factory", {"all": "all-linear"}),
    "template": Alias("chat_template", "LLaMA-Factory"),
    "finetuning_type": Alias("peft", "LLaMA-Factory", allowed=("lora",)),
}

# no tool's flag, but plainly meant: suggested, never accepted
LIKELY = {"lr": "learning_rate", "learn": "learning_rate", "epoch": "epochs", "batch_size": "micro_batch_size",
          "train_batch_size": "micro_batch_size", "max_seq_length": "seq_len", "max_length": "seq_len",
          "steps": "max_steps", "output": "output_dir", "data": "dataset", "data_path": "dataset",
          "rank": "lora_r", "gradient_accumulation": "gradient_accumulation_steps", "wd": "weight_decay",
          # HF's run_clm / run_sft scripts
          "train_file": "dataset", "dataset_name": "dataset", "validation_file": "eval_dataset",
          "eval_file": "eval_dataset", "block_size": "seq_len", "model_max_length": "seq_len"}

# their flags that this tool needs no counterpart of: the line says why
UNNEEDED = {"stage": "speft-ds trains supervised fine-tuning only (LLaMA-Factory's --stage sft): drop it",
            "do_train": "speft-ds always trains: drop it"}


def _value(name: str, alias: Alias, value: str | None) -> str | None:
    if value is not None and alias.allowed is not None and value not in alias.allowed:
        raise ConfigError(f"--{name} {value}: speft-ds runs {', '.join(alias.allowed)} (as --{alias.flag})")
    return alias.values.get(value, value) if value is not None else None


def translate_argv(argv: list[str]) -> list[str]:
    """The command line with every alias rewritten as the flag it stands for."""
    out, i = [], 0
    while i < len(argv):
        token = argv[i]
        name, has_value, inline = token[2:].partition("=") if token.startswith("--") else ("", "", "")
        alias = ALIASES.get(name)
        if alias is None:
            out.append(token)
        elif has_value:
            value = _value(name, alias, inline)
            out += [f"--{alias.flag}={value}"] if value is not None else []  # None: their "off", our default
        elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            value = _value(name, alias, argv[i + 1])
            out += [f"--{alias.flag}", value] if value is not None else []
            i += 1
        else:
            out.append(f"--{alias.flag}")  # bare: the flag's own meaning of a bare flag
        i += 1
    return out


def translate_settings(settings: dict) -> dict:
    """A --config file's settings with every alias key rewritten as the flag it stands for."""
    out = {}
    for key, value in settings.items():
        alias = ALIASES.get(str(key))
        if alias is None:
            out[key] = value
        elif isinstance(value, (list, dict)) or value is None:
            out[alias.flag] = value  # read_config_file judges lists as the flag's own
        else:
            out[alias.flag] = _value(key, alias, str(value).lower() if isinstance(value, bool) else str(value))
    return out


def meaning(name: str) -> str | None:
    """The flag an unknown name most likely means by what it says (an alias's or a plain name's), if any."""
    name = name.lstrip("-")
    return ALIASES[name].flag if name in ALIASES else LIKELY.get(name)


def known_names() -> list[str]:
    """The names besides the flags that an unknown one may be a misspelling of: the aliases (the plain names
    of LIKELY are matched whole only: near one of them is often nearer another meaning)."""
    return list(ALIASES)
