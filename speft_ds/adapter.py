"""Sparse-delta adapters: injection into a model, safetensors files, load and merge. Plain PyTorch.

File layout (OUTPUT_DIR/adapter/): adapter_model.safetensors with `NAME.indices` (int64 sorted flat
indices into NAME.weight) and `NAME.values` for each targeted module NAME that has selected entries, and
adapter_config.json, whose "shapes" maps each such NAME to its weight's shape.
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
from safetensors.torch import load_file, save_file
from torch import nn

from .bnb_weights import packed_4bit_shape
from .config import ConfigError
from .delta import sparse_delta_layer

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"


def inject_sparse_deltas(model: nn.Module, indices: dict[str, torch.Tensor],
                         values: dict[str, torch.Tensor] | None = None, impl: str = "auto") -> dict[str, nn.Module]:
    """Replace each named linear or embedding layer by its sparse-delta layer; returns the new layers."""
    layers = {}
    for name, idx in indices.items():
        parent_name, _, child_name = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        layer = sparse_delta_layer(getattr(parent, child_name), idx, None if values is None else values[name], impl)
        setattr(parent, child_name, layer)
        layers[name] = layer
    return layers


def versions() -> dict[str, str]:
    found = {}
    for package in ("speft-ds", "torch", "deepspeed", "transformers"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = "not installed"
    return found


def save_adapter(path: str | Path, indices: dict[str, torch.Tensor], values: dict[str, torch.Tensor],
                 shapes: dict[str, list[int]], meta: dict) -> None:
    """Write the adapter under a temporary name beside `path`, then rename it into place."""
    tensors = {}
    for name in indices:
        tensors[f"{name}.indices"] = indices[name].to(torch.int64).cpu().contiguous()
        tensors[f"{name}.values"] = values[name].float().cpu().contiguous()
    adapter_config = {"peft_type": "SPEFT", **meta, "k": sum(t.numel() for t in indices.values()),
                      "shapes": {name: shapes[name] for name in indices}, "versions": versions()}

    def fill(directory: Path) -> None:
        save_file(tensors, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})
        (directory / CONFIG_NAME).write_text(json.dumps(adapter_config, indent=2) + "\n")

    write_directory(path, fill)


def write_directory(path: str | Path, fill: Callable[[Path], None]) -> None:
    """`fill` a temporary directory beside `path`, then rename it into place: at every moment one complete
    adapter (the old or the new) exists at `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    tmp.chmod(0o755)
    try:
        fill(tmp)
        # Move any old adapter aside first, so at every moment one complete adapter exists.
        old = path.with_name(f".{path.name}.old") if path.exists() else None
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# Config keys that describe how a model was saved or is run, not which model it is.
_RUNTIME_CONFIG_KEYS = {"_name_or_path", "_commit_hash", "transformers_version", "torch_dtype", "dtype", "use_cache",
                        "attn_implementation", "_attn_implementation", "_attn_implementation_autoset",
                        "quantization_config"}


def base_config_hash(model_config) -> str:
    """A hash of the base model's architecture config, to refuse an adapter on another base."""
    described = {k: v for k, v in model_config.to_dict().items() if k not in _RUNTIME_CONFIG_KEYS}
    return hashlib.sha256(json.dumps(described, sort_keys=True, default=str).encode()).hexdigest()


def read_adapter(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict]:
    """(indices, values, adapter_config) from an adapter directory, refusing a corrupt or inconsistent one."""
    path = Path(path)
    if not (path / WEIGHTS_NAME).is_file() or not (path / CONFIG_NAME).is_file():
        raise ConfigError(f"{path} is not a speft-ds adapter (needs {WEIGHTS_NAME} and {CONFIG_NAME})")
    try:
        adapter_config = json.loads((path / CONFIG_NAME).read_text())
        tensors = load_file(str(path / WEIGHTS_NAME))
        names = list(adapter_config["shapes"])
        indices = {n: tensors[f"{n}.indices"] for n in names}
        values = {n: tensors[f"{n}.values"] for n in names}
    except Exception as err:  # json, safetensors and missing keys all mean the same to the user
        raise ConfigError(f"the adapter in {path} is corrupt or truncated ({type(err).__name__}): "
                          "write it again") from None
    for n in names:
        idx, numel = indices[n], adapter_config["shapes"][n][0] * adapter_config["shapes"][n][1]
        if (idx.dim() != 1 or idx.dtype != torch.int64 or values[n].shape != idx.shape
                or (idx.numel() and (idx[0] < 0 or idx[-1] >= numel or (idx[1:] <= idx[:-1]).any()))):
            raise ConfigError(f"the adapter in {path} is corrupt: {n} needs sorted unique int64 indices below "
                              f"{numel} and as many values")
    return indices, values, adapter_config


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


def _inject_from_file(model: nn.Module, path: str | Path) -> dict[str, nn.Module]:
    indices, values, adapter_config = read_adapter(path)
    check_base(getattr(model, "config", None), lambda name: module_weight_shape(model, name), adapter_config)
    return inject_sparse_deltas(model, indices, values)


def load_adapter(model: nn.Module, path: str | Path) -> nn.Module:
    """Inject the adapter's sparse deltas into `model` (unmerged, trainable values). Returns the model."""
    _inject_from_file(model, path)
    return model


def merge_adapter(model: nn.Module, path: str | Path) -> nn.Module:
    """Add the adapter's deltas into the model's weights in place, leaving plain layers. Returns the model."""
    for name, layer in _inject_from_file(model, path).items():
        parent_name, _, child_name = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child_name, layer.merge())
    return model
