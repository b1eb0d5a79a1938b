"""SPEFT's adapter format: sparse-delta injection into a model, the safetensors files, load and merge. Plain
PyTorch; what it shares with LoRA's adapters (file names, base checks, the rename into place) is in
methods/adapter_files.py.

File layout (OUTPUT_DIR/adapter/): adapter_model.safetensors with `NAME.indices` (int64 sorted flat
indices into NAME.weight) and `NAME.values` for each targeted module NAME that has selected entries, and
adapter_config.json, whose "shapes" maps each such NAME to its weight's shape.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from ...config import ConfigError
from ..adapter_files import (CONFIG_NAME, WEIGHTS_NAME, check_base, module_weight_shape, publish_directory,
                             staging_directory, versions)
from .delta import sparse_delta_layer


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


# safetensors writes wider dtypes first, then by name; the adapter's two dtypes in that order
_SAFETENSORS_DTYPES = {torch.int64: "I64", torch.float32: "F32"}
_SAFETENSORS_HEADER_ALIGN = 8


class AdapterWriter:
    """An adapter directory written module by module, so no more than one module's indices and values need
    exist at once: adapter_model.safetensors gets its header (every tensor's name, dtype and shape) first,
    then each module's bytes at their place as they come, byte for byte what safetensors' save_file writes
    for the same tensors; adapter_config.json and the rename into place come with `finish`."""

    def __init__(self, path: str | Path, counts: dict[str, int], shapes: dict[str, list[int]]):
        self.path, self.counts, self.shapes = Path(path), counts, shapes
        layout = sorted(((dtype, f"{name}.{part}", count) for name, count in counts.items()
                         for part, dtype in (("indices", torch.int64), ("values", torch.float32))),
                        key=lambda item: (list(_SAFETENSORS_DTYPES).index(item[0]), item[1]))
        header, self.offsets, end = {"__metadata__": {"format": "pt"}}, {}, 0
        for dtype, key, count in layout:
            size = count * torch.empty(0, dtype=dtype).element_size()
            header[key] = {"dtype": _SAFETENSORS_DTYPES[dtype], "shape": [count], "data_offsets": [end, end + size]}
            self.offsets[key] = (dtype, end, end + size)
            end += size
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % _SAFETENSORS_HEADER_ALIGN)
        self.data_start = 8 + len(encoded)
        self.directory = staging_directory(self.path)
        try:
            self.file = open(self.directory / WEIGHTS_NAME, "wb")
            self.file.write(len(encoded).to_bytes(8, "little") + encoded)
            self.file.truncate(self.data_start + end)
        except BaseException:
            self.abandon()
            raise
        self.written: set[str] = set()

    def add(self, name: str, indices: torch.Tensor, values: torch.Tensor) -> None:
        for part, tensor in (("indices", indices), ("values", values)):
            dtype, begin, end = self.offsets[f"{name}.{part}"]
            data = tensor.to(dtype).cpu().contiguous().numpy().tobytes()
            if len(data) != end - begin:
                raise ValueError(f"{name}.{part} has {len(data)} bytes where the header planned {end - begin}")
            self.file.seek(self.data_start + begin)
            self.file.write(data)
        self.written.add(name)

    def finish(self, meta: dict) -> None:
        """Close the file, write adapter_config.json and put the directory in place of any old one."""
        try:
            missing = set(self.counts) - self.written
            if missing:
                raise ValueError(f"the adapter was closed without {sorted(missing)[0]}")
            self.file.close()
            adapter_config = {"peft_type": "SPEFT", **meta, "k": sum(self.counts.values()),
                              "shapes": {name: self.shapes[name] for name in self.counts}, "versions": versions()}
            (self.directory / CONFIG_NAME).write_text(json.dumps(adapter_config, indent=2) + "\n")
            publish_directory(self.directory, self.path)
        except BaseException:
            self.abandon()
            raise

    def abandon(self) -> None:
        """Remove the half-written directory; any old adapter at `path` stays."""
        if getattr(self, "file", None):
            self.file.close()
        shutil.rmtree(self.directory, ignore_errors=True)


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
