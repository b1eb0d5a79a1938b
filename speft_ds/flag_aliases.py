"""The flag names users bring from HF Trainer and LLaMA-Factory, as this tool's own: one table.

An alias is rewritten into the flag it stands for (its value mapped where the two tools spell values
differently) before anything is parsed, so it passes through the same type, choice and range checks; a
--config file's keys are read the same way. LIKELY holds names that are no flag of any tool but whose
meaning is plain, for suggestions only: an unknown flag is matched against the aliases and these before
its spelling is.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .config import ConfigError


@dataclass(frozen=True)
class Alias:
    flag: str                                   # this tool's flag (a TrainConfig field)
    source: str                                 # whose name it is
    values: dict = field(default_factory=dict)  # their value -> ours, where they differ
    allowed: tuple[str, ...] | None = None      # their values that map at all (None: any)


# HF's lr_scheduler_type values this tool runs (transformers' own schedules, by the same names)
SCHEDULES = ("cosine", "linear", "constant", "constant_with_warmup")

ALIASES = {
    "num_train_epochs": Alias("epochs", "HF Trainer"),
    "per_device_train_batch_size": Alias("micro_batch_size", "HF Trainer"),
    "lr_scheduler_type": Alias("lr_scheduler", "HF Trainer", allowed=SCHEDULES),
    "resume_from_checkpoint": Alias("resume", "HF Trainer", {"true": "latest", "True": "latest"}),
    "model_name_or_path": Alias("model", "HF Trainer"),
    "deepspeed": Alias("ds_config", "HF Trainer"),
    "cutoff_len": Alias("seq_len", "LLaMA-Factory"),
    "lora_rank": Alias("lora_r", "LLaMA-Factory"),
    "lora_target": Alias("target_modules", "LLaMA-Factory", {"all": "all-linear"}),
    "template": Alias("chat_template", "LLaMA-Factory"),
}

# no tool's flag, but plainly meant: suggested, never accepted
LIKELY = {"lr": "learning_rate", "learn": "learning_rate", "epoch": "epochs", "batch_size": "micro_batch_size",
          "train_batch_size": "micro_batch_size", "max_seq_length": "seq_len", "max_length": "seq_len",
          "steps": "max_steps", "output": "output_dir", "data": "dataset", "data_path": "dataset",
          "rank": "lora_r", "gradient_accumulation": "gradient_accumulation_steps", "wd": "weight_decay"}


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
            out.append(f"--{alias.flag}={_value(name, alias, inline)}")
        elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            out += [f"--{alias.flag}", _value(name, alias, argv[i + 1])]
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
    """Every name an unknown flag may be a misspelling of: the aliases and the plain names."""
    return [*ALIASES, *LIKELY]
