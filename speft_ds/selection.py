"""Exact, deterministic top-k over scores spread across ranks, without gathering them.

A radix select: each round all-reduces a 256-bin histogram of the next 8 bits of an order-preserving
integer key, narrowing to the k-th largest score. Ties at that score are then broken by position
(module order, then lower flat index) with a second radix select over position keys. The rounds and the
histogram size are fixed, so one selection communicates the same bytes whatever the model size.
"""

from __future__ import annotations

from typing import Callable, Iterator

import torch
import torch.distributed as dist

from .config import ConfigError
from .salience import ShardScores

AllReduce = Callable[[torch.Tensor], object]
_SCORE_BITS = 32
_FLAT_INDEX_BITS = 40  # weights of up to 2^40 elements
_POSITION_BITS = 64 - 8  # module index in the top 16 bits; a multiple of 8 keeps rounds whole


def _all_reduce(tensor: torch.Tensor) -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor)


def score_keys(scores: torch.Tensor) -> torch.Tensor:
    """Map fp32 scores to int32 keys that compare (as signed integers) in the scores' order; -0.0 and 0.0
    share a key. Positive floats' bits already order as integers; negative ones need their magnitude bits
    flipped."""
    bits = (scores.float() + 0.0).view(torch.int32)
    flip = bits >> 31  # all ones for negative scores
    flip &= 0x7FFFFFFF
    return flip.bitwise_xor_(bits)


def _radix_select(key_shards: list[Callable[[], torch.Tensor]], k: int, bits: int, largest: bool, signed: bool,
                  all_reduce: AllReduce, device: torch.device) -> tuple[int, int]:
    """The k-th key (k-th largest if `largest`, else k-th smallest) over all ranks, and how many keys
    equal to it belong to the top k. Keys are `bits`-wide integers; `signed`: two's complement."""
    prefix, remaining = 0, k
    for shift in range(bits - 8, -1, -8):
        # In the top byte of a signed key, flipping the sign bit turns two's complement order into byte order.
        flip = 0x80 if signed and shift == bits - 8 else 0
        hist = torch.zeros(256, dtype=torch.int64, device=device)
        for make_keys in key_shards:
            keys = make_keys()
            if shift < bits - 8:
                keys = keys[(keys >> (shift + 8)) == (prefix >> (shift + 8))]
            hist += torch.bincount(((keys >> shift) & 0xFF) ^ flip, minlength=256)
        all_reduce(hist)
        ordered = hist.flip(0) if largest else hist
        cumulative = ordered.cumsum(0)
        b = int(torch.searchsorted(cumulative, torch.tensor(remaining, device=device)))
        remaining -= int(cumulative[b] - ordered[b])
        byte = (255 - b if largest else b) ^ flip
        if signed and shift == bits - 8 and byte >= 0x80:
            byte -= 0x100  # a negative top byte: prefix stays the key's signed value
        prefix |= byte << shift
    return prefix, remaining


def _select(shards: list[tuple[int, ShardScores]], k: int, all_reduce: AllReduce) -> list[torch.Tensor]:
    """Top-k over the given (module position, shard) pairs; returns the selected flat indices per shard."""
    device = shards[0][1].scores.device
    total = torch.tensor(sum(s.scores.numel() for _, s in shards), dtype=torch.int64, device=device)
    all_reduce(total)
    check_k(k, total.item())
    has_nan = torch.tensor(int(any(torch.isnan(s.scores).any() for _, s in shards)), dtype=torch.int64,
                           device=device)
    all_reduce(has_nan)  # every rank raises together, none waits in a collective the others left
    if has_nan.item():
        raise ConfigError("salience scores contain NaN: check the model and calibration data")

    threshold, ties_needed = _radix_select([lambda s=s: score_keys(s.scores) for _, s in shards],
                                           k, _SCORE_BITS, True, True, all_reduce, device)
    # Entries at the threshold score, as position keys (module position, then flat index): found once,
    # since the tie-break's rounds read them again and again.
    tied = [(position << _FLAT_INDEX_BITS) | (torch.nonzero(score_keys(s.scores) == threshold).view(-1) + s.start)
            for position, s in shards]
    last_tie, _ = _radix_select([lambda t=t: t for t in tied], ties_needed, _POSITION_BITS, False, False,
                                all_reduce, device)
    selected = []
    for (position, s), ties in zip(shards, tied):
        above = torch.nonzero(score_keys(s.scores) > threshold).view(-1) + s.start
        chosen = ties[ties <= last_tie] - (position << _FLAT_INDEX_BITS)
        selected.append(torch.cat([above, chosen]).sort().values)
    return selected


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
    selected = _select(list(enumerate(scores.values())), k, all_reduce)
    return dict(zip(scores, selected))


def select_local(scores: dict[str, ShardScores], density: float,
                 all_reduce: AllReduce = _all_reduce) -> dict[str, torch.Tensor]:
    """The same fraction inside each weight: k_w = max(1, round(density * numel_w))."""
    return {name: _select([(0, s)], max(1, round(density * s.numel)), all_reduce)[0]
            for name, s in scores.items()}


def gather_indices(selected: dict[str, torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, full sorted index list) per weight, joined from every rank's selection: one weight at a time,
    so no rank ever holds every weight's whole list. A collective per weight."""
    for name, mine in selected.items():
        yield name, _gather_one(mine)


def _gather_one(mine: torch.Tensor) -> torch.Tensor:
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return mine
    world = dist.get_world_size()
    counts = [torch.empty(1, dtype=torch.int64, device=mine.device) for _ in range(world)]
    dist.all_gather(counts, torch.tensor([mine.numel()], dtype=torch.int64, device=mine.device))
    longest = max(int(c) for c in counts)
    padded = [torch.empty(longest, dtype=torch.int64, device=mine.device) for _ in range(world)]
    dist.all_gather(padded, torch.nn.functional.pad(mine, (0, longest - mine.numel())))
    # Rank r holds flat range [r * ps, (r + 1) * ps), so joining in rank order keeps indices sorted.
    return torch.cat([flat[: int(c)] for flat, c in zip(padded, counts)])


# Score histogram bins: log10 |score| from 1e-12 to 1e4, 64 bins; smaller magnitudes land in the first.
_LOG10_LOW, _LOG10_HIGH, _BINS = -12.0, 4.0, 64


def score_summary(scores: dict[str, ShardScores], selected: dict[str, torch.Tensor]) -> dict:
    """A compact, all-reduced summary of the score distribution (never the scores themselves): histograms
    of log10 |score| for positive and negative scores, the zero count, and the lowest selected score."""
    device = next(iter(scores.values())).scores.device
    counts = torch.zeros(2 * _BINS + 1, dtype=torch.int64, device=device)
    lowest = torch.tensor(float("inf"), device=device)
    for name, s in scores.items():
        nonzero = s.scores[s.scores != 0]
        logs = nonzero.abs().log10().clamp(_LOG10_LOW, _LOG10_HIGH - 1e-6)
        bins = ((logs - _LOG10_LOW) / (_LOG10_HIGH - _LOG10_LOW) * _BINS).long()
        counts[:_BINS] += torch.bincount(bins[nonzero > 0], minlength=_BINS)
        counts[_BINS:2 * _BINS] += torch.bincount(bins[nonzero < 0], minlength=_BINS)
        counts[-1] += int((s.scores == 0).sum())
        if selected[name].numel():
            lowest = torch.minimum(lowest, s.scores[selected[name] - s.start].min())
    _all_reduce(counts)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(lowest, op=dist.ReduceOp.MIN)
    return {"log10_edges": torch.linspace(_LOG10_LOW, _LOG10_HIGH, _BINS + 1).tolist(),
            "positive": counts[:_BINS].tolist(), "negative": counts[_BINS:2 * _BINS].tolist(),
            "zero": int(counts[-1]), "lowest_selected": lowest.item()}
