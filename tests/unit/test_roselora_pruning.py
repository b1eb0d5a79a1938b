"""RoseLoRA's schedule, smoothing and row/column masks (speft_ds.methods.roselora.pruning) against values
worked out by hand and a plain-Python reference."""

from __future__ import annotations

from fractions import Fraction

import pytest
import torch

from speft_ds.methods.roselora.pruning import factor_masks, keep_fraction, kept_per_line, line_mask, smoothed

T, SPARSITY, START, END = 100, 0.9, 0.1, 0.8


def test_the_schedule_is_dense_then_cubic_then_final():
    keep = [keep_fraction(step, T, SPARSITY, START, END) for step in range(1, T + 1)]
    assert keep[:10] == [1.0] * 10 and keep[10] < 1.0  # dense for steps 1-10 (t_i = 10), pruned after step 11
    assert keep[44] == pytest.approx(0.1 + 0.9 * 0.5 ** 3)  # step 45: half-way from t_i = 10 to t_f = 80
    assert keep[79:] == [pytest.approx(0.1)] * 21  # from step t_f = 80 to the end
    assert all(a >= b for a, b in zip(keep, keep[1:]))
    assert keep_fraction(T, T, SPARSITY, START, 1.0) == pytest.approx(0.1)  # --rose_end 1: final at the last step
    assert keep_fraction(3, 4, SPARSITY, 0.5, 0.6) == pytest.approx(0.1)  # t_i = t_f = 2 after rounding


def test_smoothing_starts_from_the_first_sensitivity():
    first = smoothed(None, torch.tensor([2.0, 0.0]), 0.8)
    assert torch.equal(first, torch.tensor([2.0, 0.0]))
    assert torch.allclose(smoothed(first, torch.tensor([1.0, 5.0]), 0.8), torch.tensor([1.8, 1.0]))


def _reference(scores: torch.Tensor, keep: float) -> torch.Tensor:
    """Each row zeroes its floor((1 - keep) x length) lowest scores, the earlier of equal scores first."""
    mask = torch.ones_like(scores, dtype=torch.bool)
    dropped = round(Fraction(1) - Fraction(keep).limit_denominator(1000), 9) * scores.shape[1]
    for i, row in enumerate(scores.tolist()):
        for j in sorted(range(len(row)), key=lambda j: (row[j], j))[:int(dropped)]:
            mask[i, j] = False
    return mask


def test_a_line_of_ten_at_sparsity_point_one_drops_one():
    assert kept_per_line(10, 1 - 0.1) == 9  # (1 - 0.9) x 10 is 0.999... in floating point


@pytest.mark.parametrize("keep", [1.0, 0.7, 0.25, 0.01, 1 - 0.1])
def test_line_masks_keep_the_most_important_of_each_row_and_column(keep):
    torch.manual_seed(0)
    scores = torch.randint(0, 4, (5, 10)).float()  # many ties
    assert torch.equal(line_mask(scores, keep, dim=1), _reference(scores, keep))
    assert torch.equal(line_mask(scores.T, keep, dim=0), _reference(scores, keep).T)
    mask_a, mask_b = factor_masks(scores, scores.T.contiguous(), keep)  # A is r x in, B is out x r
    assert torch.equal(mask_a, _reference(scores, keep)) and torch.equal(mask_b, _reference(scores, keep).T)
