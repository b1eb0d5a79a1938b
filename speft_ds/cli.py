"""The command line, derived from the TrainConfig dataclass fields."""

from __future__ import annotations

import argparse
import gc
import sys
import typing
from dataclasses import MISSING, fields
from typing import Callable, Sequence

from .config import ConfigError, TrainConfig, TrainingError
from .launch_env import local_rank_from_env


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
        value_type = _value_type(hints[f.name])
        kwargs = dict(help=f"{f.metadata['help']} (default: {f.default})", type=value_type)
        if value_type is _parse_bool:
            kwargs.update(nargs="?", const=True, metavar="BOOL")
        elif "const" in f.metadata:
            kwargs.update(nargs="?", const=f.metadata["const"])
        parser.add_argument(f"--{f.name}", **kwargs)
    return parser


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one-line ConfigErrors (exit code 2 through run_main)."""

    def error(self, message):
        raise ConfigError(f"{message}: see --help")


def adapter_tool_parser(description: str) -> Parser:
    """Flags shared by the tools that apply an adapter to its base model (merge, generate)."""
    parser = Parser(description=description)
    parser.add_argument("--model", required=True,
                        help="Base HF model directory (or .gguf file) the adapter was trained on.")
    parser.add_argument("--adapter", required=True,
                        help="Adapter directory (adapter_model.safetensors + adapter_config.json).")
    parser.add_argument("--trust_remote_code", action="store_true", help="Allow model code from the model directory.")
    return parser


def parse_config(argv: Sequence[str]) -> tuple[TrainConfig, set[str]]:
    """Return the config and the names of the flags the user gave explicitly."""
    given = vars(build_parser().parse_args(list(argv)))
    defaults = {f.name: f.default for f in fields(TrainConfig) if f.default is not MISSING}
    config = TrainConfig(**{**defaults, **given})
    config.check()
    return config, set(given)


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
