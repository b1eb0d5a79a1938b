"""Dynamic masks: the pieces of a mask update that do not depend on how the recipe wires engines.

reselect (the paper's): fold every delta into W, score again, select k anew, start from zero deltas.
drop_regrow: fold the smallest |value| entries into W, regrow as many by salience among entries not
selected; kept entries keep their values and optimizer moments, new ones start from zero.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import nn

from ...runtime import zero3
from .salience import ShardScores
from .selection import select_global


class FoldedDeltas:
    """Deltas already added into the base weights during training, remembered so that the saved adapter
    stays relative to the original base model (it then holds up to k entries per update)."""

    def __init__(self):
        self.parts: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = defaultdict(list)

    def fold(self, weights: dict[str, nn.Parameter], indices: dict[str, torch.Tensor],
             values: dict[str, torch.Tensor]) -> None:
        """W += scatter(indices, values) for each named frozen base weight, shard by shard."""
        for name in indices:
            zero3.add_to_shard(weights[name], indices[name], values[name])
            self.parts[name].append((indices[name].cpu(), values[name].float().cpu()))

    def refold(self, weights: dict[str, nn.Parameter]) -> None:
        """Apply everything folded so far to freshly loaded base weights (on resume), in the same order."""
        for name, parts in self.parts.items():
            for idx, values in parts:
                zero3.add_to_shard(weights[name], idx, values)

    def state(self) -> dict[str, torch.Tensor]:
        """Every folded part as named tensors, for a checkpoint (folded/PART/indices|values/LAYER)."""
        tensors = {}
        for name, parts in self.parts.items():
            for i, (idx, values) in enumerate(parts):
                tensors[f"folded/{i}/indices/{name}"] = idx.contiguous()
                tensors[f"folded/{i}/values/{name}"] = values.contiguous()
        return tensors

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor]) -> "FoldedDeltas":
        """The parts `state` wrote (other keys ignored), in folding order."""
        folded = cls()
        parts = sorted({int(key.split("/", 2)[1]) for key in tensors if key.startswith("folded/")})
        for i in parts:  # in folding order; each part keeps its layers' (indices, values)
            for key in sorted(k for k in tensors if k.startswith(f"folded/{i}/indices/")):
                name = key[len(f"folded/{i}/indices/"):]
                folded.parts[name].append((tensors[key], tensors[f"folded/{i}/values/{name}"]))
        return folded

    def total(self, names: list[str], indices: dict[str, torch.Tensor], values: dict[str, torch.Tensor]
              ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Everything folded plus the current deltas: sorted unique indices per layer, values summed."""
        all_indices, all_values = {}, {}
        for name in names:
            parts = self.parts.get(name, []) + ([(indices[name].cpu(), values[name].cpu())] if name in indices else [])
            if not parts:
                continue
            unique, inverse = torch.unique(torch.cat([i for i, _ in parts]), sorted=True, return_inverse=True)
            all_indices[name] = unique
            all_values[name] = torch.zeros(unique.numel()).index_add_(0, inverse, torch.cat([v for _, v in parts]))
        return all_indices, all_values


def unwrap(model: nn.Module, layers: dict[str, nn.Module]) -> None:
    """Put each sparse-delta layer's base layer back in its place."""
    for name, layer in layers.items():
        parent_name, _, child_name = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child_name, layer.base_layer)


def largest_magnitudes(values: dict[str, torch.Tensor], n_keep: int) -> dict[str, torch.Tensor]:
    """Positions (into each values vector) of the n_keep largest |value| over all layers, ties to the
    earlier layer, then the lower position. Every rank holds all values, so this needs no communication."""
    scores = {name: ShardScores(0, v.abs().float(), v.numel(), 0) for name, v in values.items()}
    return select_global(scores, n_keep, all_reduce=lambda tensor: None)


def union(names: list[str], kept: dict[str, torch.Tensor], grown: dict[str, torch.Tensor],
          kept_tensors: dict[str, dict[str, torch.Tensor]]) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """Sorted union of kept and grown indices per layer (in `names` order, empty layers left out), with
    each kept entry's tensors (values, moments: the same keys for every layer) carried to its new
    position and zeros for grown entries."""
    keys = next(iter(kept_tensors.values())).keys() if kept_tensors else ()
    no_index = torch.zeros(0, dtype=torch.int64)
    indices, tensors = {}, {}
    for name in names:
        old, new = kept.get(name, no_index), grown.get(name, no_index)
        if old.numel() + new.numel() == 0:
            continue
        order = torch.argsort(torch.cat([old, new]))
        indices[name] = torch.cat([old, new])[order]
        carried = kept_tensors.get(name, {key: torch.zeros(0) for key in keys})
        tensors[name] = {key: torch.cat([carried[key], torch.zeros(new.numel())])[order] for key in keys}
    return indices, tensors
