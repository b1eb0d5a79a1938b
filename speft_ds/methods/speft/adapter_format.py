"""SPEFT's adapter format: sparse-delta injection into a model, the safetensors files, load and merge. Plain
PyTorch; what it shares with LoRA's adapters (file names, base checks, the rename into place) is in
methods/adapter_files.py.

File layout (OUTPUT_DIR/adapter/): adapter_model.safetensors with `NAME.indices` (int64 sorted flat
indices into NAME.weight) and `NAME.values` for each targeted module NAME that has selected entries, and
adapter_config.json, whose "shapes" maps each such NAME to its weight's shape.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from ...config import ConfigError
from ..adapter_files import CONFIG_NAME, WEIGHTS_NAME, StreamedAdapter, check_base, module_weight_shape, versions
from .delta import sparse_delta_layer


def inject_sparse_deltas(model: nn.Module, indices: dict[str, torch.Tensor],
                         values: dict[str, torch.Tensor] | None = None, impl: str = "auto",
                         scales: dict[str, torch.Tensor] | None = None) -> dict[str, nn.Module]:
    """Replace each named linear or embedding layer by its sparse-delta layer (with `scales`, per entry, where
    given); returns the new layers."""
    layers = {}
    for name, idx in indices.items():
        parent_name, _, child_name = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        layer = sparse_delta_layer(getattr(parent, child_name), idx, None if values is None else values[name], impl,
                                   None if scales is None else scales[name])
        setattr(parent, child_name, layer)
        layers[name] = layer
    return layers


# adapter_config.json's peft_type: "SPEFT", then what PeftModel.from_pretrained shows in the KeyError it raises
# for a type it does not know (PEFT offers no way to register one outside its own enum of types).
PEFT_TYPE = ("SPEFT: a speft-ds adapter (sparse deltas), which PEFT cannot load: load it with "
             "speft_ds.load_adapter(model, path), or merge it into the base with speft-merge")


class AdapterWriter(StreamedAdapter):
    """A SPEFT adapter directory written module by module (StreamedAdapter): each module's indices and
    values as they come; adapter_config.json and the rename into place with `finish`."""

    def __init__(self, path: str | Path, counts: dict[str, int], shapes: dict[str, list[int]]):
        self.counts, self.shapes = counts, shapes
        super().__init__(path, {f"{name}.{part}": (dtype, [count]) for name, count in counts.items()
                                for part, dtype in (("indices", torch.int64), ("values", torch.float32))})

    def add(self, name: str, indices: torch.Tensor, values: torch.Tensor) -> None:
        self.add_tensor(f"{name}.indices", indices)
        self.add_tensor(f"{name}.values", values)

    def finish(self, meta: dict) -> None:
        adapter_config = {"peft_type": PEFT_TYPE, **meta, "k": sum(self.counts.values()),
                          "shapes": {name: self.shapes[name] for name in self.counts}, "versions": versions()}
        super().finish(lambda directory: (directory / CONFIG_NAME).write_text(json.dumps(adapter_config, indent=2)
                                                                             + "\n"))


def save_adapter(path: str | Path, indices: dict[str, torch.Tensor], values: dict[str, torch.Tensor],
                 shapes: dict[str, list[int]], meta: dict) -> None:
    """Write an adapter held whole in memory (the tools'), through AdapterWriter."""
    writer = AdapterWriter(path, {name: idx.numel() for name, idx in indices.items()}, shapes)
    try:
        for name in indices:
            writer.add(name, indices[name], values[name])
    except BaseException:
        writer.abandon()
        raise
    writer.finish(meta)


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
