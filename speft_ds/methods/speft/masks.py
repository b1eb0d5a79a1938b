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
from ...runtime.distributed import gather_ragged
from .salience import ShardScores
from .selection import select_global


class FoldedDeltas:
    """Deltas already added into the base weights during training, remembered so that the saved adapter stays
    relative to the original base model (it then holds up to k entries per update).

    Each rank keeps only the entries inside its own shard of each base weight, and every rank the same
    number of parts per weight (some empty): a checkpoint stores each rank's parts with the range they
    cover, a resume on any number of ranks reads only the saved parts that overlap its shard, and the
    adapter gathers one weight's parts at a time."""

    def __init__(self):
        self.parts: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = defaultdict(list)

    def fold(self, weights: dict[str, nn.Parameter], indices: dict[str, torch.Tensor],
             values: dict[str, torch.Tensor]) -> None:
        """W += scatter(indices, values) for each named frozen base weight, shard by shard."""
        for name in indices:
            zero3.add_to_shard(weights[name], indices[name], values[name])
            self.parts[name].append(_inside(zero3.shard_range(weights[name]), indices[name].cpu(),
                                            values[name].float().cpu()))

    def layout(self) -> dict[str, int]:
        """Each folded weight's number of parts (the same on every rank)."""
        return {name: len(parts) for name, parts in self.parts.items()}

    def slices(self, weights: dict[str, nn.Parameter]) -> dict[str, tuple[tuple[int, int], torch.Tensor]]:
        """This rank's parts for a checkpoint, each with the range of its weight's shard they cover."""
        slices = {}
        for name, parts in self.parts.items():
            covered = zero3.shard_range(weights[name])
            for i, (idx, values) in enumerate(parts):
                slices[f"folded/{i}/indices/{name}"] = (covered, idx)
                slices[f"folded/{i}/values/{name}"] = (covered, values)
        return slices

    @classmethod
    def restore(cls, point, layout: dict[str, int], weights: dict[str, nn.Parameter]) -> "FoldedDeltas":
        """The parts a checkpoint saved (`layout`: their number per weight) that fall in this rank's shards,
        read from the saved ranks whose shards overlap them, applied to freshly loaded base weights in
        folding order."""
        folded = cls()
        for name, count in layout.items():
            covered = zero3.shard_range(weights[name])
            for i in range(count):
                idx = point.read_pieces(f"folded/{i}/indices/{name}", *covered) or [torch.zeros(0, dtype=torch.long)]
                values = point.read_pieces(f"folded/{i}/values/{name}", *covered) or [torch.zeros(0)]
                part = _inside(covered, torch.cat(idx).long(), torch.cat(values).float())
                zero3.add_to_shard(weights[name], *part)
                folded.parts[name].append(part)
        return folded

    def total(self, names: list[str], indices: dict[str, torch.Tensor], values: dict[str, torch.Tensor]
              ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Everything folded (gathered from every rank: two collectives per folded weight) plus the current
        deltas: sorted unique indices per layer, values summed. An index lies in one rank's shard, so its
        folded values arrive in folding order, as they were added into the base."""
        all_indices, all_values = {}, {}
        for name in names:
            parts = []
            if self.parts.get(name):  # this rank's parts end to end, then every rank's joined in rank order
                mine = self.parts[name]
                parts.append((gather_ragged(torch.cat([idx for idx, _ in mine])),
                              gather_ragged(torch.cat([v for _, v in mine]))))
            parts += [(indices[name].cpu(), values[name].cpu())] if name in indices else []
            if not parts:
                continue
            unique, inverse = torch.unique(torch.cat([i for i, _ in parts]), sorted=True, return_inverse=True)
            all_indices[name] = unique
            all_values[name] = torch.zeros(unique.numel()).index_add_(0, inverse, torch.cat([v for _, v in parts]))
        return all_indices, all_values


def _inside(covered: tuple[int, int], indices: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    start, stop = covered
    inside = (indices >= start) & (indices < stop)
    return indices[inside], values[inside]


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
