"""What every method's adapter directory shares (SPEFT's own format, methods/speft/adapter_format.py; LoRA's,
methods/lora/adapter.py): the file names, the package versions recorded in it, the checks that refuse an
adapter on another base (the base config's hash, each target's weight shape), and the write beside the old
directory then rename into place that leaves one complete adapter at its path at every moment, and the
weights file written one module at a time (StreamedAdapter).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch
from torch import nn

from ..config import ConfigError
from ..models.bnb_weights import packed_4bit_shape
from ..models.published import readable_by_all
from ..runtime.safetensors_stream import SafetensorsWriter

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"


def versions() -> dict[str, str]:
    found = {}
    for package in ("speft-ds", "torch", "deepspeed", "transformers"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = "not installed"
    return found


def staging_directory(path: Path) -> Path:
    """A new temporary directory beside `path`, to fill before publish_directory puts it in place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))


def publish_directory(tmp: Path, path: Path) -> None:
    """Rename a filled directory into place, the old one moved aside first: at every moment one complete
    adapter (the old or the new) exists at `path`."""
    readable_by_all(tmp)
    old = path.with_name(f".{path.name}.old") if path.exists() else None
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
    os.replace(tmp, path)
    if old is not None:
        shutil.rmtree(old)


class StreamedAdapter:
    """An adapter directory whose adapter_model.safetensors is written one tensor at a time
    (SafetensorsWriter), so no more than one module's tensors need exist at once: `add_tensor` each, then
    `finish` writes the directory's other files and renames it into place; `abandon` removes it, leaving
    any old adapter at `path`."""

    def __init__(self, path: str | Path, layout: dict[str, tuple[torch.dtype, list[int]]]):
        self.path = Path(path)
        self.directory = staging_directory(self.path)
        try:
            self.weights = SafetensorsWriter(self.directory / WEIGHTS_NAME, layout, {"format": "pt"})
        except BaseException:
            self.abandon()
            raise

    def add_tensor(self, key: str, tensor: torch.Tensor) -> None:
        self.weights.add(key, tensor)

    def finish(self, fill: Callable[[Path], None]) -> None:
        """Close the weights file, `fill` the directory with the other files and put it in place."""
        try:
            self.weights.close()
            fill(self.directory)
            publish_directory(self.directory, self.path)
        except BaseException:
            self.abandon()
            raise

    def abandon(self) -> None:
        if getattr(self, "weights", None):
            self.weights.abandon()
        shutil.rmtree(self.directory, ignore_errors=True)


# Config keys that describe how a model was saved or is run, not which model it is.
_RUNTIME_CONFIG_KEYS = {"_name_or_path", "_commit_hash", "transformers_version", "torch_dtype", "dtype", "use_cache",
                        "attn_implementation", "_attn_implementation", "_attn_implementation_autoset",
                        "quantization_config"}


def base_config_hash(model_config) -> str:
    """A hash of the base model's architecture config, to refuse an adapter on another base."""
    described = {k: v for k, v in model_config.to_dict().items() if k not in _RUNTIME_CONFIG_KEYS}
    return hashlib.sha256(json.dumps(described, sort_keys=True, default=str).encode()).hexdigest()


def check_base(model_config, weight_shape: Callable[[str], list[int] | None], adapter_config: dict) -> None:
    """Refuse an adapter trained on another base: its config hash, and each target's weight shape
    (`weight_shape(name)`, None where the model has no such weight)."""
    expected = adapter_config.get("base_config_hash")
    if expected and model_config is not None and base_config_hash(model_config) != expected:
        raise ConfigError(f"the adapter was trained on another base model ({adapter_config.get('base_model_name_or_path')}; "
                          "its config differs from this model's): load the base it was trained on")
    for name, shape in adapter_config["shapes"].items():
        actual = weight_shape(name)
        if actual is None:
            raise ConfigError(f"the adapter targets {name}, which the model does not have: "
                              "use the base model the adapter was trained on")
        if list(actual) != list(shape):
            raise ConfigError(f"the adapter's {name} has shape {shape} but the model's is {list(actual)}: "
                              "use the base model the adapter was trained on")


def module_weight_shape(model: nn.Module, name: str) -> list[int] | None:
    try:
        weight = model.get_submodule(name).weight
    except AttributeError:
        return None
    return list(packed_4bit_shape(weight) or weight.shape)
