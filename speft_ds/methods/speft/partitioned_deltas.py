"""Sparse-delta layers in a ZeRO-3 model: created partitioned (zero.Init), like the weights beside them,
and registered so that ZeRO-3 gathers the base weight a delta layer reads itself."""

from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import nn

from ...runtime import zero3
from ..adapter_files import check_base
from .adapter_format import inject_sparse_deltas, read_adapter


def inject_partitioned(model: nn.Module, ds_config: dict, indices: Iterable[tuple[str, torch.Tensor]],
                       values: dict[str, torch.Tensor] | None = None, impl: str = "auto",
                       scales_of: Callable[[str, torch.Tensor], torch.Tensor] | None = None) -> dict[str, nn.Module]:
    """Wrap each named weight in a delta layer whose values and indices (and, with `scales_of(name, indices)`,
    per-entry scales) are partitioned as they are created. `indices` may be a generator: each weight's whole
    index list need exist only while its layer is built. Weights with no index get no layer (ZeRO-3 cannot
    partition an empty parameter)."""
    layers = {}
    with zero3.partitioned_init(ds_config):
        for name, idx in indices:
            if idx.numel():
                layers.update(inject_sparse_deltas(model, {name: idx}, None if values is None else {name: values[name]},
                                                   impl, None if scales_of is None else {name: scales_of(name, idx)}))
    # A delta layer multiplies by W + D itself instead of calling its base layer.
    for layer in layers.values():
        for param in layer.base_layer.parameters():
            zero3.use_in_forward(layer, param)
    return layers


def load_adapter_partitioned(model: nn.Module, path, ds_config: dict, impl: str = "auto",
                             rename: Callable[[str], str] = lambda name: name) -> dict[str, nn.Module]:
    """A saved adapter's deltas injected into a ZeRO-3 model, partitioned (unmerged), after the checks
    load_adapter makes: the same base config and the same weight shapes. `rename`: where in this model each
    saved module is (RoSA's: under a LoRA layer)."""
    indices, values, adapter_config = read_adapter(path)

    def weight_shape(name: str):
        try:
            return list(zero3.full_shape(model.get_submodule(rename(name)).weight))
        except AttributeError:
            return None

    check_base(getattr(model, "config", None), weight_shape, adapter_config)
    return inject_partitioned(model, ds_config, ((rename(name), idx) for name, idx in indices.items()),
                              {rename(name): v for name, v in values.items()}, impl)
