"""Adapter files of every method, for the tools that apply one to its base (merge, generate, evaluate): the
format is told by adapter_config.json's peft_type (SPEFT: flat indices + values; LORA: PEFT's LoRA files,
written by --peft lora and roselora; ROSA: one of each, in lora/ and sparse/)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from . import adapter_files, adapter_type
from .rosa import adapter as rosa_files
from .speft import adapter_format as speft_files
from .speft.delta_impls import add_delta_


class SpeftDeltas:
    """A SPEFT adapter as dense updates, for the streaming merge."""

    def __init__(self, path):
        self.indices, self.values, self.config = speft_files.read_adapter(path)
        self.modules = set(self.indices)

    def check_base(self, model_config, weight_shape) -> None:
        adapter_files.check_base(model_config, weight_shape, self.config)

    def add_to(self, module: str, weight: torch.Tensor) -> torch.Tensor:
        return add_delta_(weight, self.indices[module], self.values[module])


class LoraDeltas:
    """A PEFT-format LoRA adapter as dense updates, for the streaming merge."""

    def __init__(self, path):
        from .lora.adapter import LoraAdapter

        self.adapter = LoraAdapter(path)
        self.modules = set(self.adapter.factors)

    def check_base(self, model_config, weight_shape) -> None:
        self.adapter.check_base(model_config, weight_shape)

    def add_to(self, module: str, weight: torch.Tensor) -> torch.Tensor:
        return weight.add_(self.adapter.delta(module))


class RosaDeltas:
    """RoSA's two parts as one dense update per module: the sparse deltas, then the LoRA product."""

    def __init__(self, path):
        self.parts = [SpeftDeltas(Path(path) / "sparse"), LoraDeltas(Path(path) / "lora")]
        self.modules = set().union(*(part.modules for part in self.parts))

    def check_base(self, model_config, weight_shape) -> None:
        for part in self.parts:
            part.check_base(model_config, weight_shape)

    def add_to(self, module: str, weight: torch.Tensor) -> torch.Tensor:
        for part in self.parts:
            if module in part.modules:
                weight = part.add_to(module, weight)
        return weight


def read_deltas(path: str | Path):
    """The adapter at `path` with `modules`, `check_base(model_config, weight_shape)` and `add_to(module,
    fp32 weight)`."""
    return {"SPEFT": SpeftDeltas, "ROSA": RosaDeltas}.get(adapter_type(path), LoraDeltas)(path)


def load_adapter(model: nn.Module, path: str | Path) -> nn.Module:
    """The model with the adapter applied, unmerged: SPEFT's delta layers injected in place, or for a LoRA
    adapter PEFT's own PeftModel.from_pretrained (after our base checks). Returns the model to use."""
    if adapter_type(path) == "SPEFT":
        return speft_files.load_adapter(model, path)
    if adapter_type(path) == "ROSA":
        return rosa_files.load(model, Path(path))
    from peft import PeftModel

    from .lora.adapter import LoraAdapter

    LoraAdapter(path).check_base(getattr(model, "config", None),
                                 lambda name: adapter_files.module_weight_shape(model, name))
    return PeftModel.from_pretrained(model, str(path))


def merge_adapter(model: nn.Module, path: str | Path) -> nn.Module:
    """The model with the adapter's updates added into its weights, plain layers left. Returns the model."""
    if adapter_type(path) == "SPEFT":
        return speft_files.merge_adapter(model, path)
    if adapter_type(path) == "ROSA":  # W + D, then + the LoRA product
        return merge_adapter(merge_adapter(model, Path(path) / "sparse"), Path(path) / "lora")
    return load_adapter(model, path).merge_and_unload()


def load_adapter_partitioned(model: nn.Module, path: str | Path, ds_config: dict) -> None:
    """The adapter into a ZeRO-3 model, unmerged: SPEFT's deltas partitioned as they are created, LoRA's
    factors as plain tensors that the engine built next partitions."""
    from ..runtime import zero3

    from .speft.partitioned_deltas import load_adapter_partitioned as load_speft

    if adapter_type(path) == "SPEFT":
        load_speft(model, path, ds_config)
        return
    if adapter_type(path) == "ROSA":  # the LoRA layers first, then the sparse deltas under them
        load_adapter_partitioned(model, Path(path) / "lora", ds_config)
        load_speft(model, Path(path) / "sparse", ds_config, rename=lambda name: f"{name}{rosa_files.BASE}")
        return
    from .lora.adapter import LoraAdapter

    adapter = LoraAdapter(path)

    def weight_shape(name: str):
        try:
            return list(zero3.full_shape(model.get_submodule(name).weight))
        except AttributeError:
            return None

    adapter.check_base(getattr(model, "config", None), weight_shape)
    adapter.load_into(model, next(model.parameters()).dtype)
