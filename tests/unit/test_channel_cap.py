"""The cap per input channel, in one process, against a plain-torch reference: a stable sort per column,
then the stable-sort top-k (tests/references.py)."""

from __future__ import annotations

import pytest
import torch

from speft_ds.config import ConfigError
from speft_ds.methods.speft.channel_cap import column_caps
from speft_ds.methods.speft.salience import ShardScores
from speft_ds.methods.speft.selection import select_from_groups
from tests.references import reference_capped_top_k

SHAPES = {"a.q_proj": (12, 7), "a.down_proj": (5, 16), "b.v_proj": (30, 3)}


def planted(kind: str, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    if kind == "ties":  # a handful of values, so columns and the k-th score are full of ties
        return {n: torch.randint(-2, 4, shape, generator=gen).float() for n, shape in SHAPES.items()}
    # one loud input channel per weight, as a gradient score has on a loud input
    scores = {n: torch.rand(shape, generator=gen) for n, shape in SHAPES.items()}
    for s in scores.values():
        s[:, 1] *= 100.0
    return scores


def capped_selection(scores: dict[str, torch.Tensor], k: int, ratio: float, groups: int = 1):
    caps = column_caps(SHAPES, k / sum(s.numel() for s in scores.values()), ratio)
    shards = {n: ShardScores(0, s.flatten().clone(), s.numel(), 0) for n, s in scores.items()}
    names = list(shards)
    grouped = [dict(list(shards.items())[i::groups]) for i in range(groups)]
    grouped = [{n: g[n] for n in names if n in g} for g in grouped]
    return select_from_groups(iter(grouped), names, k=k, column_caps=caps)[0], caps


@pytest.mark.parametrize("kind", ["ties", "loud"])
@pytest.mark.parametrize("ratio", [1.0, 1.5, 3.0])
@pytest.mark.parametrize("k", [1, 9, 40, 100])
def test_capped_selection_matches_reference(kind, ratio, k):
    scores = planted(kind, seed=k)
    for groups in (1, 3):  # all weights at once, and one weight per group
        got, caps = capped_selection(scores, k, ratio, groups)
        want, _ = reference_capped_top_k(list(scores.values()), [caps[n][0] for n in scores], k)
        assert sum(t.numel() for t in got.values()) == k
        for i, name in enumerate(scores):
            assert got[name].tolist() == sorted(want[i]), (name, groups)


def test_the_cap_bounds_every_column_and_moves_k_off_the_loud_channel():
    scores = planted("loud", seed=0)
    k = 40  # the loud channels hold 47 entries
    plain = select_from_groups(iter([{n: ShardScores(0, s.flatten().clone(), s.numel(), 0)
                                      for n, s in scores.items()}]), list(scores), k=k)[0]
    capped, caps = capped_selection(scores, k, ratio=2.0)
    loud = {name: (indices % SHAPES[name][1] == 1).sum().item() for name, indices in plain.items()}
    assert sum(loud.values()) == k  # uncapped, the loud channels take all of k
    for name, indices in capped.items():
        per_column = torch.bincount(indices % SHAPES[name][1], minlength=SHAPES[name][1])
        assert per_column.max().item() <= caps[name][0]
    assert sum((capped[n] % SHAPES[n][1] == 1).sum().item() for n in capped) < k


def test_caps_are_the_ratio_times_a_columns_even_share():
    assert column_caps({"w": (576, 576), "d": (576, 1536)}, 0.0086, 2.0) == {"w": (10, 576), "d": (10, 1536)}
    assert column_caps({"w": (4, 100)}, 0.01, 1.0) == {"w": (1, 100)}


def test_a_nan_score_is_reported_before_the_cap_could_hide_it():
    scores = planted("loud", seed=1)
    scores["a.q_proj"][3, 0] = float("nan")  # in a quiet column: outside its cap
    with pytest.raises(ConfigError, match="NaN"):
        capped_selection(scores, 10, ratio=1.0)
