"""A cap on how many selected entries one input channel (a column of a targeted weight) may hold.

Why: a gradient score |dY^T X| grows with its input's magnitude, so a plain global top-k crowds onto the
few loudest input channels (docs/quality_v2.md measures it), and an update on such a channel reaches every
token. With a cap, only the `cap` highest-scoring entries of each column stay selectable: the rest get a
score of -inf before the top-k, exactly and deterministically over any number of ranks.

A column's entries are spread over every rank's flat (row-major) shard. Each rank keeps its own top `cap`
of each column as int64 keys ordered as the selection orders entries within a column (higher score, then
lower row); the cap-th largest key of each column over all ranks is then built one bit at a time, high to
low: each round all-reduces, for every column of the group, how many keys lie at or above a trial value.
That is 64 rounds of one count per column, whatever the number of ranks or the cap. Memory: a few int64
copies of one weight's shard at a time, beside the group's scores.
"""

from __future__ import annotations

import math

import torch

from .salience import ShardScores
from .selection_keys import AllReduce, score_keys

_BELOW_ALL = torch.iinfo(torch.int64).min  # pads a column's candidates: below every real entry's key
_ROW_BITS = 32


def column_caps(shapes: dict[str, tuple[int, int]], fraction: float, ratio: float) -> dict[str, tuple[int, int]]:
    """Each weight's (cap per column, columns): the cap is `ratio` times a column's even share of a
    selection that takes `fraction` of the targeted elements, ceil(ratio x fraction x rows). With ratio >= 1
    every weight keeps at least its fraction selectable, so the top-k can always be filled."""
    return {name: (math.ceil(ratio * fraction * rows), columns) for name, (rows, columns) in shapes.items()}


def _column_grid(s: ShardScores, columns: int) -> tuple[torch.Tensor, int]:
    """This shard's entry keys laid out on the rows it touches ([rows, columns]), and the offset of its
    first entry in that grid. Where the shard does not reach, the grid holds keys below every real one."""
    first_row = s.start // columns
    rows = -(-(s.start + s.scores.numel()) // columns) - first_row
    offset = s.start - first_row * columns
    grid = torch.full((rows * columns,), _BELOW_ALL, dtype=torch.int64, device=s.scores.device)
    grid[offset:offset + s.scores.numel()] = score_keys(s.scores).long() << _ROW_BITS
    # the lower row wins a tie of scores, as the lower flat index does in the global top-k; the padding
    # stays below every real key (those start at score_keys(-inf) << 32)
    lower_first = (1 << _ROW_BITS) - 1 - torch.arange(first_row, first_row + rows, device=grid.device)
    return grid.view(rows, columns) + lower_first.unsqueeze(1), offset


def _local_top(s: ShardScores, cap: int, columns: int) -> torch.Tensor:
    """This rank's `cap` highest keys of each column (fewer where its shard has fewer rows)."""
    grid = _column_grid(s, columns)[0]
    return grid.topk(min(cap, grid.shape[0]), dim=0).values


def _kth_largest_per_column(tops: list[torch.Tensor], caps: list[int], all_reduce: AllReduce) -> torch.Tensor:
    """The caps[i]-th largest key of each column of weight i over every rank (columns of all weights
    concatenated): the largest value with at least cap keys at or above it, built from the sign bit down."""
    device = tops[0].device
    need = torch.cat([torch.full((top.shape[1],), cap, dtype=torch.int64, device=device)
                      for top, cap in zip(tops, caps)])
    widths = [top.shape[1] for top in tops]
    zero = torch.zeros(sum(widths), dtype=torch.int64, device=device)
    # the sign bit first: at least `cap` keys >= 0, or the threshold is negative
    threshold = torch.where(_count_at_or_above(tops, zero, widths, all_reduce) >= need, zero, zero + _BELOW_ALL)
    for bit in range(62, -1, -1):
        trial = threshold | (1 << bit)
        threshold = torch.where(_count_at_or_above(tops, trial, widths, all_reduce) >= need, trial, threshold)
    return threshold


def _count_at_or_above(tops: list[torch.Tensor], values: torch.Tensor, widths: list[int],
                       all_reduce: AllReduce) -> torch.Tensor:
    counts = torch.cat([(top >= v.unsqueeze(0)).sum(0) for top, v in zip(tops, values.split(widths))])
    all_reduce(counts)
    return counts


def cap_input_channels(scores: dict[str, ShardScores], caps: dict[str, tuple[int, int]],
                       all_reduce: AllReduce) -> None:
    """Set to -inf, in place, every entry of this rank's score shards outside the `cap` highest of its
    column over all ranks (caps: name -> (cap, the weight's columns), column_caps). Collectives: every rank
    calls it with the same weights."""
    names = list(scores)
    # one weight's grid at a time, made again for the masking: never a whole group's int64 keys at once
    tops = [_local_top(scores[name], *caps[name]) for name in names]
    thresholds = _kth_largest_per_column(tops, [caps[name][0] for name in names], all_reduce)
    for name, threshold in zip(names, thresholds.split([caps[name][1] for name in names])):
        s = scores[name]
        grid, offset = _column_grid(s, caps[name][1])
        outside = (grid < threshold.unsqueeze(0)).view(-1)[offset:offset + s.scores.numel()]
        s.scores[outside] = float("-inf")
