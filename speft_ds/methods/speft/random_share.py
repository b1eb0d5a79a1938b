"""--random_fraction: a share of the mask placed uniformly at random in each weight before the salience score
places the rest.

Why: a gradient score crowds a mask onto the loudest input channels (docs/quality_v2.md), where a random mask of
the same size spreads it and learned more in this project's benchmark; spread masks win often in the
literature (S2FT's random channels, SHiRA, SpIEL's random start). A mixed mask keeps part of each.

The random share of each weight is its quota's `fraction` (largest remainder, so the shares add up to
round(fraction x k) exactly), drawn from the same hash of (seed, weight name, flat index) as `--metric
random`: the same entries on any number of ranks.
"""

from __future__ import annotations

import torch
from torch import nn

from ...runtime import zero3
from .salience import ShardScores, ShardStats, random_score
from .selection import select_local, split_budget


def random_quotas(quotas: dict[str, int], fraction: float) -> dict[str, int]:
    """Each weight's random share of its quota: round(fraction x k) split in proportion to the quotas, so no
    weight's share exceeds its quota."""
    total = sum(quotas.values())
    return dict(zip(quotas, split_budget(round(fraction * total), list(quotas.values()))))


def random_picks(targets: dict[str, nn.Module], quotas: dict[str, int], seed: int) -> dict[str, torch.Tensor]:
    """This rank's flat indices of each weight's `quotas[name]` uniformly random entries (collectives: every
    rank calls it with the same weights). One weight's random scores exist at a time."""
    picks = {}
    for name, module in targets.items():
        start, stop = zero3.shard_range(module.weight)
        scores = random_score(ShardStats(name, start, stop - start, None, seed))
        shard = ShardScores(start, scores, zero3.full_numel(module.weight), 0)
        picks.update(select_local({name: shard}, {name: quotas[name]}))
    return picks


def joined(first: dict[str, torch.Tensor], second: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Two disjoint selections of flat indices, per weight, as one sorted selection."""
    names = list(dict.fromkeys([*first, *second]))
    empty = torch.zeros(0, dtype=torch.int64)
    return {name: torch.cat([first.get(name, empty).to(second.get(name, empty).device), second.get(name, empty)])
            .sort().values for name in names}
