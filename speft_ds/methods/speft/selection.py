"""Exact, deterministic top-k over scores spread across ranks, without gathering them.

Scores map to order-preserving int32 keys. A histogram of the keys' high 16 bits, all-reduced, finds the
bin of the k-th largest score; a second pass takes everything above that bin and a histogram of the low
16 bits of the bin's own entries finds the k-th score itself. Ties at that score are broken by position
(module order, then lower flat index) with a radix select over position keys, 8 bits per round. The rounds
and histogram sizes are fixed, so one selection communicates the same bytes whatever the model size.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import torch
import torch.distributed as dist

from ...config import ConfigError
from ...runtime.distributed import device as comm_device, gather_ragged
from .channel_cap import cap_input_channels
from .salience import ShardScores
from .selection_keys import AllReduce, score_keys

_FLAT_INDEX_BITS = 40  # weights of up to 2^40 elements
_POSITION_BITS = 64 - 8  # module index in the top 16 bits; a multiple of 8 keeps rounds whole


def _all_reduce(tensor: torch.Tensor, op=dist.ReduceOp.SUM) -> None:
    """In place over every rank, through the communication device (scores may sit in host memory)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        moved = tensor.to(comm_device())
        dist.all_reduce(moved, op=op)
        tensor.copy_(moved)


def _smallest_key(key_shards: list[torch.Tensor], k: int, bits: int, all_reduce: AllReduce,
                  device: torch.device) -> int:
    """The k-th smallest of non-negative `bits`-wide integer keys over all ranks, 8 bits per round."""
    prefix, remaining = 0, k
    for shift in range(bits - 8, -1, -8):
        hist = torch.zeros(256, dtype=torch.int64, device=device)
        for keys in key_shards:
            if shift < bits - 8:
                keys = keys[(keys >> (shift + 8)) == (prefix >> (shift + 8))]
            hist += torch.bincount((keys >> shift) & 0xFF, minlength=256)
        all_reduce(hist)
        cumulative = hist.cumsum(0)
        b = int(torch.searchsorted(cumulative, torch.tensor(remaining, device=device)))
        remaining -= int(cumulative[b] - hist[b])
        prefix |= b << shift
    return prefix


def _kth_largest_bin(hist: torch.Tensor, k: int) -> tuple[int, int]:
    """The bin of a histogram holding its k-th largest entry, and how many of that bin's entries are among
    the k largest."""
    ordered = hist.flip(0)
    cumulative = ordered.cumsum(0)
    b = int(torch.searchsorted(cumulative, torch.tensor(k, device=hist.device)))
    return hist.numel() - 1 - b, k - int(cumulative[b] - ordered[b])


_HALF_BINS = 1 << 16


@dataclass
class _Candidates:
    """Scores on this rank, each named by a position key (module position << 40 | flat index) that breaks
    ties: the lower key wins."""
    scores: torch.Tensor
    position_keys: Callable[[torch.Tensor], torch.Tensor]  # offsets into `scores` -> their int64 keys


def _shard_candidates(position: int, shard: ShardScores) -> _Candidates:
    first = (position << _FLAT_INDEX_BITS) + shard.start
    return _Candidates(shard.scores, lambda offsets: offsets + first)


def _global_sum(value: int, all_reduce: AllReduce) -> int:
    total = torch.tensor(value, dtype=torch.int64)
    all_reduce(total)
    return int(total)


def _check_no_nan(scores: Iterable[torch.Tensor], all_reduce: AllReduce) -> None:
    # every rank raises together, none waits in a collective the others left
    if _global_sum(int(any(torch.isnan(s).any() for s in scores)), all_reduce):
        raise ConfigError("salience scores contain NaN: check the model and calibration data")


def _select(sources: list[_Candidates], k: int, all_reduce: AllReduce) -> list[torch.Tensor]:
    """Top-k over every rank's candidates (k at most their number); returns, per source, the sorted offsets
    of its selected scores.

    Two passes over the scores: a histogram of the keys' high 16 bits (sign, exponent and the top mantissa
    bits) finds the bin of the k-th score; a second pass takes every entry above that bin and keeps the
    bin's own entries, usually a small share, as candidates for a histogram of their low 16 bits."""
    device = sources[0].scores.device
    hist = torch.zeros(_HALF_BINS, dtype=torch.int64, device=device)
    for s in sources:
        hist += torch.bincount((score_keys(s.scores) >> 16) + _HALF_BINS // 2, minlength=_HALF_BINS)
    all_reduce(hist)
    high, needed = _kth_largest_bin(hist, k)
    high -= _HALF_BINS // 2
    above, inside, low = [], [], []
    for s in sources:
        keys = score_keys(s.scores)
        above.append(torch.nonzero((keys >> 16) > high).view(-1))
        offsets = torch.nonzero((keys >> 16) == high).view(-1)
        inside.append(offsets)
        low.append(keys[offsets] & 0xFFFF)
        del keys
    hist = torch.zeros(_HALF_BINS, dtype=torch.int64, device=device)
    for bits in low:
        hist += torch.bincount(bits, minlength=_HALF_BINS)
    all_reduce(hist)
    threshold, ties_needed = _kth_largest_bin(hist, needed)
    # Entries at the k-th score itself, by position (module position, then flat index): the lower keys win.
    tied = [offsets[bits == threshold] for offsets, bits in zip(inside, low)]
    tied_keys = [s.position_keys(offsets) for s, offsets in zip(sources, tied)]
    last_tie = _smallest_key(tied_keys, ties_needed, _POSITION_BITS, all_reduce, device)
    return [torch.cat([up, offsets[bits > threshold], ties[keys <= last_tie]]).sort().values
            for up, offsets, bits, ties, keys in zip(above, inside, low, tied, tied_keys)]


class RunningTopK:
    """The exact global top-k of scores that arrive a group of weights at a time.

    Each rank keeps the entries of its own shards that are in the top k of everything seen so far (their
    score and position key: about k / ranks of them), and merges each new group into them with one
    selection. Since the order (score, then module position, then flat index) is total, the top k of
    (top k so far + new group) is the top k of everything: the result equals one selection over all
    weights at once, ties included."""

    def __init__(self, k: int, names: list[str], all_reduce: AllReduce = _all_reduce):
        self.k, self.all_reduce = k, all_reduce
        self.positions = {name: position for position, name in enumerate(names)}
        self.scores = torch.zeros(0)
        self.keys = torch.zeros(0, dtype=torch.int64)
        self.seen = 0  # entries offered so far, over all ranks

    def add(self, shards: dict[str, ShardScores]) -> None:
        sources = [_shard_candidates(self.positions[name], s) for name, s in shards.items()]
        _check_no_nan((s.scores for s in sources), self.all_reduce)
        self.seen += _global_sum(sum(s.scores.numel() for s in sources), self.all_reduce)
        device = sources[0].scores.device  # the kept entries start empty on the host
        kept_keys = self.keys.to(device)
        kept = _Candidates(self.scores.to(device), lambda offsets: kept_keys[offsets])
        sources.insert(0, kept)
        if self.seen <= self.k:
            chosen = [torch.arange(s.scores.numel(), device=s.scores.device) for s in sources]
        else:
            chosen = _select(sources, self.k, self.all_reduce)
        self.keys = torch.cat([s.position_keys(offsets) for s, offsets in zip(sources, chosen)])
        self.scores = torch.cat([s.scores[offsets] for s, offsets in zip(sources, chosen)])

    def selected(self) -> dict[str, torch.Tensor]:
        """This rank's selected flat indices per weight (sorted; every weight offered, empty where none)."""
        check_k(self.k, self.seen)
        keys = self.keys.sort().values
        modules, flat = keys >> _FLAT_INDEX_BITS, keys & ((1 << _FLAT_INDEX_BITS) - 1)
        return {name: flat[modules == position] for name, position in self.positions.items()}


def check_k(k: int, total_elements: int) -> None:
    if not 1 <= k <= total_elements:
        raise ConfigError(f"k = {k} is outside [1, {total_elements}] targeted elements: change --density or "
                          "--num_trainable")


def num_to_select(density: float, num_trainable: int | None, total_elements: int) -> int:
    k = num_trainable if num_trainable is not None else max(1, round(density * total_elements))
    check_k(k, total_elements)
    return k


def select_global(scores: dict[str, ShardScores], k: int,
                  all_reduce: AllReduce = _all_reduce) -> dict[str, torch.Tensor]:
    """One top-k over all targeted weights together. Returns this rank's selected flat indices per weight."""
    top = RunningTopK(k, list(scores), all_reduce)
    top.add(scores)
    return top.selected()


def split_budget(total: int, weights: list[int]) -> list[int]:
    """`total` split in proportion to `weights` by largest remainder (ties: the earlier weight), so the parts
    add up to `total` exactly."""
    whole = sum(weights)
    parts = [total * w // whole for w in weights]
    by_remainder = sorted(range(len(weights)), key=lambda i: (-(total * weights[i] % whole), i))
    for i in by_remainder[:total - sum(parts)]:
        parts[i] += 1
    return parts


def select_local(scores: dict[str, ShardScores], quotas: dict[str, int],
                 all_reduce: AllReduce = _all_reduce) -> dict[str, torch.Tensor]:
    """Each weight's own top `quotas[name]` (none where its quota is 0)."""
    return {name: select_global({name: s}, quotas[name], all_reduce)[name] if quotas[name]
            else torch.zeros(0, dtype=torch.int64, device=s.scores.device) for name, s in scores.items()}


def exclude(scores: dict[str, ShardScores], indices: dict[str, torch.Tensor]) -> None:
    """Make the given flat indices unselectable (score -inf) in this rank's score shards."""
    for name, s in scores.items():
        if name in indices:
            inside = indices[name][(indices[name] >= s.start) & (indices[name] < s.start + s.scores.numel())]
            s.scores[inside - s.start] = float("-inf")


def normalize_per_weight(scores: dict[str, ShardScores], all_reduce: AllReduce = _all_reduce) -> None:
    """Divide each weight's scores, in place, by its mean |score| over every rank: a global top-k then
    compares each element with its own weight's typical score, so weights whose scores run larger (by
    shape or position) do not take most of k. A weight whose scores are all zero is left as it is."""
    sums = torch.stack([s.scores.abs().sum(dtype=torch.float64) for s in scores.values()])
    all_reduce(sums)
    for s, total in zip(scores.values(), sums.tolist()):
        if total > 0:
            s.scores.div_(total / s.numel)


def select_from_groups(groups: Iterable[dict[str, ShardScores]], names: list[str], k: int | None = None,
                       quotas: dict[str, int] | None = None, excluded: dict[str, torch.Tensor] | None = None,
                       normalize: bool = False, column_caps: dict[str, tuple[int, int]] | None = None
                       ) -> tuple[dict[str, torch.Tensor], dict, float]:
    """The global top-k (or, given `quotas` instead, each weight's own top quotas[name]) over scores that
    arrive one group of weights at a time (`names`: every weight, in model order), never holding more
    than one group's scores. `excluded` entries cannot be selected; with `normalize` each weight's scores
    are first divided by their mean magnitude (normalize_per_weight); with `column_caps` (name -> (cap,
    columns)) only the cap highest entries of each of a weight's columns can be (channel_cap). Returns
    this rank's selected flat indices per weight, the score summary, and the seconds spent selecting
    (beside producing scores)."""
    top, summary, selected, seconds = RunningTopK(k, names) if quotas is None else None, ScoreSummary(), {}, 0.0
    for scores in groups:
        started = time.perf_counter()
        if normalize:
            normalize_per_weight(scores)
        _check_no_nan((s.scores for s in scores.values()), _all_reduce)
        exclude(scores, excluded or {})
        summary.add(scores)
        if column_caps:  # after the summary, which describes the scores themselves
            cap_input_channels(scores, column_caps, _all_reduce)
        if top:
            top.add(scores)
        else:
            chosen = select_local(scores, quotas)
            for name, indices in chosen.items():
                summary.add_selected(scores[name].scores[indices - scores[name].start])
            selected.update(chosen)
        del scores
        seconds += time.perf_counter() - started
    if top:
        selected = top.selected()
        summary.add_selected(top.scores)
    return selected, summary.result(), seconds


def gather_indices(selected: dict[str, torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, full sorted index list) per weight, joined from every rank's selection: one weight at a time,
    so no rank ever holds every weight's whole list. A collective per weight. Rank r holds flat range
    [r * ps, (r + 1) * ps), so joining in rank order keeps the indices sorted."""
    for name, mine in selected.items():
        yield name, gather_ragged(mine)


# Score histogram bins: log10 |score| from 1e-12 to 1e4, 64 bins; smaller magnitudes land in the first.
_LOG10_LOW, _LOG10_HIGH, _BINS = -12.0, 4.0, 64


class ScoreSummary:
    """A compact summary of the score distribution (never the scores themselves), built group by group:
    histograms of log10 |score| for positive and negative scores, the zero count, and the lowest selected
    score."""

    def __init__(self):
        self.counts = torch.zeros(2 * _BINS + 1, dtype=torch.int64)
        self.lowest = float("inf")

    def add(self, scores: dict[str, ShardScores]) -> None:
        for s in scores.values():
            nonzero = s.scores[s.scores != 0]
            logs = nonzero.abs().log10().clamp(_LOG10_LOW, _LOG10_HIGH - 1e-6)
            bins = ((logs - _LOG10_LOW) / (_LOG10_HIGH - _LOG10_LOW) * _BINS).long()
            positive = nonzero > 0
            # counted where the scores are: only the counts cross to the host
            self.counts[:_BINS] += torch.bincount(bins[positive], minlength=_BINS).cpu()
            self.counts[_BINS:2 * _BINS] += torch.bincount(bins[~positive], minlength=_BINS).cpu()
            self.counts[-1] += int((s.scores == 0).sum())

    def add_selected(self, selected_scores: torch.Tensor) -> None:
        if selected_scores.numel():
            self.lowest = min(self.lowest, selected_scores.min().item())

    def result(self) -> dict:
        """Every rank's summary joined (collectives)."""
        counts = self.counts.clone()
        _all_reduce(counts)
        lowest = torch.tensor(self.lowest)
        _all_reduce(lowest, op=dist.ReduceOp.MIN)
        return {"log10_edges": torch.linspace(_LOG10_LOW, _LOG10_HIGH, _BINS + 1).tolist(),
                "positive": counts[:_BINS].tolist(), "negative": counts[_BINS:2 * _BINS].tolist(),
                "zero": int(counts[-1]), "lowest_selected": lowest.item()}
