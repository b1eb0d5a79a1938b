"""The command line, derived from the TrainConfig dataclass fields."""

from __future__ import annotations

import argparse
import difflib
import gc
import sys
import typing
from dataclasses import MISSING, asdict, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Sequence

from . import flag_aliases
from .config import ConfigError, TrainConfig, TrainingError
from .config.inputs import utf8_problem
from .runtime.launch_env import local_rank_from_env


def _parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes"):
        return True
    if text.lower() in ("0", "false", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got '{text}'")


def _value_type(annotation) -> Callable:
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    base = args[0] if args else annotation
    return _parse_bool if base is bool else base


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="train.py", description="Salience-aware sparse fine-tuning under DeepSpeed ZeRO-3.",
                     argument_default=argparse.SUPPRESS)
    hints = typing.get_type_hints(TrainConfig)
    for f in fields(TrainConfig):
        value_type = f.metadata.get("parse") or _value_type(hints[f.name])
        kwargs = dict(help=f"{f.metadata['help']} (default: {f.default})", type=value_type)
        if value_type is _parse_bool:
            kwargs.update(nargs="?", const=True, metavar="BOOL")
        elif "const" in f.metadata:
            kwargs.update(nargs="?", const=f.metadata["const"])
        parser.add_argument(f"--{f.name}", **kwargs)
    parser.add_argument("--config", help="YAML or JSON file of these flags' names and values; flags given on the "
                                         "command line override it.")
    return parser


def closest(name: str, known: Sequence[str]) -> str | None:
    """The known name a misspelt one most likely meant, if any is close."""
    close = difflib.get_close_matches(name, known, n=1)
    return close[0] if close else None


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one-line ConfigErrors (exit code 2 through run_main); an
    unknown flag names the flag it most likely means, as an unknown --config key does. Flags are never
    abbreviated: `--lr` is no prefix of `--lr_scheduler`."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, allow_abbrev=False, **kwargs)

    def error(self, message):
        unknown = message.removeprefix("unrecognized arguments: ").split() if message.startswith("unrecognized") else []
        flag = next((token.split("=", 1)[0] for token in unknown if token.startswith("--")), None)
        if flag and flag[2:] in flag_aliases.UNNEEDED:
            raise ConfigError(f"{flag}: {flag_aliases.UNNEEDED[flag[2:]]}")
        guess = flag and suggestion(flag, [o.lstrip("-") for o in self._option_string_actions if o.startswith("--")])
        if guess:
            raise ConfigError(f"unknown flag {flag}: did you mean --{guess}? (see --help)")
        raise ConfigError(f"{message}: see --help")


def suggestion(name: str, known: Sequence[str]) -> str | None:
    """The known flag an unknown name most likely means: by what it says (an HF Trainer or LLaMA-Factory name,
    or a plain one such as lr), then by spelling, among the known flags and those names."""
    name = name.lstrip("-")
    meant = flag_aliases.meaning(name)
    if meant in known:
        return meant
    guess = closest(name, [*known, *flag_aliases.known_names()])
    meant = guess and (flag_aliases.meaning(guess) or guess)
    return meant if meant in known else None


def adapter_tool_parser(description: str) -> Parser:
    """Flags shared by the tools that apply an adapter to its base model (merge, generate)."""
    parser = Parser(description=description)
    parser.add_argument("--model", required=True,
                        help="Base HF model directory (or .gguf file) the adapter was trained on.")
    parser.add_argument("--adapter", required=True,
                        help="Adapter directory (adapter_model.safetensors + adapter_config.json).")
    parser.add_argument("--trust_remote_code", action="store_true", help="Allow model code from the model directory.")
    return parser


def parse_config(argv: Sequence[str], files: bool = True) -> tuple[TrainConfig, set[str]]:
    """Return the config and the names of the flags the user gave explicitly (on the command line or in
    the --config file); `files=False` leaves out the checks of the files the flags name (the planner's)."""
    parser = build_parser()
    argv = flag_aliases.translate_argv(list(argv))
    config_file = vars(parser.parse_args(argv)).get("config")
    # The file's settings become flags ahead of the command line's, so that argparse checks their types and
    # choices the same way and the command line wins.
    file_flags = [token for key, value in read_config_file(config_file).items() if value is not None
                  for token in (f"--{key}", _flag_value(value))] if config_file else []
    given = vars(parser.parse_args(file_flags + argv))
    given.pop("config", None)
    defaults = {f.name: f.default for f in fields(TrainConfig) if f.default is not MISSING}
    config = TrainConfig(**{**defaults, **given})
    # a file (such as a saved run_config.yaml) lists every setting: only the command line's are "given" for
    # the check of flags another method reads; the file's count where they differ from the default
    config.check(set(vars(parser.parse_args(argv))) - {"config"}, files=files)
    return config, set(given)


def read_config_file(path: str) -> dict:
    """A --config file's settings: a mapping of train.py's flag names to values (JSON is YAML too)."""
    import yaml

    if not Path(path).is_file():
        raise ConfigError(f"--config {path} does not exist: pass a YAML or JSON file of flag names and values")
    if problem := utf8_problem(path):
        raise ConfigError(f"--config {path} {problem}")
    try:
        settings = yaml.safe_load(Path(path).read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"--config {path} is not valid YAML or JSON ({str(err).splitlines()[0]})") from None
    if not isinstance(settings, dict):
        raise ConfigError(f"--config {path} must map flag names to values, as in `density: 0.01`")
    settings = flag_aliases.translate_settings(settings)
    names = [f.name for f in fields(TrainConfig)]
    for key, value in settings.items():
        if key in flag_aliases.UNNEEDED:
            raise ConfigError(f"--config {path}: {key}: {flag_aliases.UNNEEDED[key]}")
        if key not in names:
            guess = suggestion(str(key), names)
            hint = f"did you mean {guess}?" if guess else "its keys are train.py's flag names (see --help)"
            raise ConfigError(f"--config {path}: unknown key '{key}': {hint}")
        if isinstance(value, list) and key in LIST_FLAGS and all(isinstance(v, str) for v in value):
            settings[key] = ",".join(value)  # YAML's list form of a comma-separated flag
        elif isinstance(value, (list, dict)):
            raise ConfigError(f"--config {path}: {key} must be a single value, as on the command line")
    _check_relative_paths(path, settings)
    if settings.get("resume") is True:  # the flag alone: the latest checkpoint
        settings["resume"] = "latest"
    elif settings.get("resume") is False:
        settings["resume"] = None
    return settings


# Flags that name files or directories: a relative one is read from the current directory, as on the command line.
PATH_FLAGS = ("model", "dataset", "eval_dataset", "ds_config", "eval_task", "retention_text", "fisher_text")


def _check_relative_paths(path: str, settings: dict) -> None:
    """A relative path in a --config file means what it means on the command line (the current directory, as
    HF Trainer and LLaMA-Factory read it); where it is missing there but present beside the file, say so."""
    beside = Path(path).resolve().parent
    for key in PATH_FLAGS:
        for value in str(settings.get(key) or "").split(","):
            value = value.strip()
            if value and not Path(value).is_absolute() and not Path(value).exists() and (beside / value).exists():
                raise ConfigError(f"--config {path}: {key} {value} is read from the current directory "
                                  f"({Path.cwd()}), where it is not; it is beside the config file: give "
                                  f"{beside / value}, or run from {beside}")


# Flags whose value is a comma-separated list, which a --config file may give as a YAML list.
LIST_FLAGS = ("target_modules", "report_to")


def _flag_value(value) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def _rerunnable(config: TrainConfig) -> dict:
    """The settings as a --config file gives them back: not the launcher's local rank (each rank's anew), and
    a warm-up given as --warmup_ratio kept as the ratio, not as the steps the run derived from it."""
    settings = asdict(config)
    del settings["local_rank"]
    if settings["warmup_ratio"]:
        settings["warmup_steps"] = 0
    return settings


def write_run_config(config: TrainConfig, path: Path) -> None:
    """The resolved configuration, in the --config format: rerun it with `--config path`."""
    import yaml

    settings = _rerunnable(config)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(settings, sort_keys=False))


def record_resume(config: TrainConfig, path: Path, tag: str, world_size: int) -> None:
    """Under the first run's settings in `path` (kept: `--config path` still reruns that run), one comment line
    for this resume: when, from which checkpoint, on how many ranks, and the settings that differ."""
    import yaml

    if not path.is_file():  # a first run's file is gone: this run's settings stand in for it
        write_run_config(config, path)
    first = yaml.safe_load(path.read_text()) or {}
    now = {key: value for key, value in _rerunnable(config).items() if key != "resume"}
    differ = [f"{key} {first.get(key)!r} -> {value!r}" for key, value in now.items() if first.get(key) != value]
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    with path.open("a") as fh:
        fh.write(f"# resumed {when} from checkpoints/{tag} on {world_size} rank{'s' * (world_size > 1)}"
                 + (f"; settings that differ: {', '.join(differ)}" if differ else "") + "\n")


def default_lines(explicit: set[str]) -> list[str]:
    """A line for each of --model and --dataset left to its default, naming what the job uses instead."""
    from .config import DEFAULT_MODEL, EMBEDDED_DATASET

    lines = []
    if "model" not in explicit:
        lines.append(f"speft-ds: no --model given: the default, SmolLM2-135M-Instruct ({DEFAULT_MODEL})")
    if "dataset" not in explicit:
        lines.append(f"speft-ds: no --dataset given: the embedded arithmetic problems ({EMBEDDED_DATASET})")
    return lines


def is_reporting_rank() -> bool:
    """Local rank 0 reports: before distributed init only the launcher's environment says who we are."""
    return local_rank_from_env() == 0


def run_main(main: Callable[[Sequence[str]], int], argv: Sequence[str] | None = None) -> int:
    """Run an entry point: a ConfigError (exit code 2) or TrainingError (exit code 1) becomes one line on
    stderr, printed by local rank 0 only."""
    try:
        return main(sys.argv[1:] if argv is None else argv)
    except (ConfigError, TrainingError) as err:
        if is_reporting_rank():
            print(f"error: {err}", file=sys.stderr)
        return 2 if isinstance(err, ConfigError) else 1
    finally:
        # A DeepSpeed engine and its model sit in reference cycles; collected during interpreter exit, their
        # process groups' gloo threads can abort a finished run ("terminate called without an active
        # exception"). Collect them now, while the interpreter is whole.
        gc.collect()
