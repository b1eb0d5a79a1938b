"""Exact ties across ranks: planted scores, exactly representable in fp32 and full of ties that straddle
shard and weight boundaries, give the same mask on 1, 2 and 4 real ranks (gloo), and that mask is the
documented order's: higher score first, then lower weight position, then lower flat index."""

from __future__ import annotations

import math

import pytest
import torch

from tests.distributed.harness import run_ranks
from tests.references import reference_top_k

# Odd sizes, so ZeRO-3's shards are padded; 5 elements on 4 ranks leave the last rank holding none.
NUMELS = (37, 5, 64, 23)
# k ending inside a run of ties, at a weight's edge, before and after the zeros, and every element.
KS = (1, 10, 29, 64, 100, 128, sum(NUMELS))


def planted_scores() -> list[torch.Tensor]:
    """Multiples of 1/4 in [-2, 2] (exact in fp32), -0.0 beside 0.0, and each weight's first and last
    elements tied with the other weights' so ties cross every shard and weight boundary."""
    g = torch.Generator().manual_seed(5)
    scores = [torch.randint(-8, 9, (n,), generator=g).float() / 4 for n in NUMELS]
    for s in scores:
        s[0], s[-1] = 1.0, 1.0
    scores[2][10:20] = -0.0
    scores[2][20:30] = 0.0
    return scores


def _worker(rank, world_size, scores):
    from speft_ds.methods.speft.salience import ShardScores
    from speft_ds.methods.speft.selection import gather_indices, select_global

    shards = {}
    for position, full in enumerate(scores):
        size = math.ceil(full.numel() / world_size)  # ZeRO-3's even split; the padding is not scored
        start = min(rank * size, full.numel())
        shards[f"w{position}"] = ShardScores(start, full[start:start + size].clone(), full.numel(), 0)
    return {k: dict(gather_indices(select_global(shards, k))) for k in KS}


@pytest.fixture(scope="module")
def masks(tmp_path_factory):
    root = tmp_path_factory.mktemp("ties")
    scores = planted_scores()
    return {world: run_ranks(_worker, world, scores, out_dir=root / str(world)) for world in (1, 2, 4)}


def test_planted_scores_tie_across_shards_and_weights():
    flat = torch.cat(planted_scores())
    assert flat.unique().numel() <= 17 < flat.numel() // 4  # every score shared by several elements
    assert torch.equal(flat, flat * 4 / 4)  # exact in fp32


@pytest.mark.parametrize("world", [1, 2, 4])
def test_every_rank_gets_the_reference_mask(masks, world):
    scores = planted_scores()
    for k in KS:
        want, _ = reference_top_k(scores, k)
        for rank, rank_masks in enumerate(masks[world]):
            got = rank_masks[k]
            assert list(got) == [f"w{i}" for i in range(len(NUMELS))]
            for i, indices in enumerate(got.values()):
                assert indices.tolist() == sorted(want[i]), f"k={k}, weight {i}, rank {rank} of {world}"


def test_reference_breaks_ties_by_weight_then_index():
    """The reference itself, on a case small enough to read: four scores of 1.0, k = 3."""
    chosen, kth = reference_top_k([torch.tensor([0.5, 1.0, 1.0]), torch.tensor([1.0, 2.0, 1.0])], 3)
    assert chosen == [{1, 2}, {1}] and kth == 1.0
