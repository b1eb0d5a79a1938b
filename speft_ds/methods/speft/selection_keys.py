"""The order every selection works in (the global top-k, the cap per input channel): fp32 scores as int32
keys that compare as the scores do, and the collective the selections are written against."""

from __future__ import annotations

from typing import Callable

import torch

AllReduce = Callable[[torch.Tensor], object]  # in place, summing over every rank


def score_keys(scores: torch.Tensor) -> torch.Tensor:
    """Map fp32 scores to int32 keys that compare (as signed integers) in the scores' order; -0.0 and 0.0
    share a key. Positive floats' bits already order as integers; negative ones need their magnitude bits
    flipped."""
    bits = (scores.float() + 0.0).view(torch.int32)
    flip = bits >> 31  # all ones for negative scores
    flip &= 0x7FFFFFFF
    return flip.bitwise_xor_(bits)
