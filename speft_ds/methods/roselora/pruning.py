"""RoseLoRA's pruning, in plain torch on whole tensors: the schedule, the smoothed sensitivity and the
row/column masks. Every rank computes the same masks from the same gathered scores."""

from __future__ import annotations

import math

import torch


def keep_fraction(step: int, total_steps: int, sparsity: float, start: float, end: float) -> float:
    """The fraction of each row of A and column of B kept after optimizer step `step` (1-based): 1 for the
    first t_i = round(start x total) steps (dense), then the cubic schedule, reaching 1 - sparsity at step
    t_f = round(end x total) and held there to the last step."""
    t_i, t_f = round(start * total_steps), round(end * total_steps)
    final = 1.0 - sparsity
    if step >= t_f:
        return final
    if step <= t_i:
        return 1.0
    return final + (1.0 - final) * (1.0 - (step - t_i) / (t_f - t_i)) ** 3


def smoothed(previous: torch.Tensor | None, sensitivity: torch.Tensor, beta: float) -> torch.Tensor:
    """beta x previous + (1 - beta) x sensitivity; the first sensitivity as it is."""
    return sensitivity.clone() if previous is None else previous.mul(beta).add_(sensitivity, alpha=1.0 - beta)


def kept_per_line(length: int, keep: float) -> int:
    """Entries kept in a line of `length`: the floor((1 - keep) x length) least important are zeroed (the
    product rounded first: 1 - 0.9 is not exactly 0.1)."""
    return length - math.floor(round((1.0 - keep) * length, 9))


def line_mask(scores: torch.Tensor, keep: float, dim: int) -> torch.Tensor:
    """True where an entry is kept: along `dim`, each line keeps its kept_per_line most important entries
    (ties: the later position is kept)."""
    length = scores.shape[dim]
    dropped = length - kept_per_line(length, keep)
    mask = torch.ones_like(scores, dtype=torch.bool)
    if dropped:
        order = torch.argsort(scores, dim=dim, stable=True)  # ascending: the least important first
        mask.scatter_(dim, order.narrow(dim, 0, dropped), False)
    return mask


def factor_masks(score_a: torch.Tensor, score_b: torch.Tensor, keep: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Masks for A (r x in: per row) and B (out x r: per column)."""
    return line_mask(score_a, keep, dim=1), line_mask(score_b, keep, dim=0)
