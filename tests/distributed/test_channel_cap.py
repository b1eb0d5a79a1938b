"""The cap per input channel across ranks: planted scores full of ties, on weights whose ZeRO-3 shards start
mid-row (and, on 4 ranks, a rank holding nothing of one weight), give on 1, 2 and 4 real ranks (gloo) the
mask of a dense single-process reference: each column's cap highest entries, then the global top-k."""

from __future__ import annotations

import math

import pytest
import torch

from tests.distributed.harness import run_ranks
from tests.references import reference_capped_top_k

SHAPES = {"w0": (9, 7), "w1": (1, 3), "w2": (13, 5), "w3": (6, 11)}
KS = (1, 12, 40, 90)
RATIO = 1.5


def planted_scores() -> dict[str, torch.Tensor]:
    """Quarters in [-1, 2] (exact in fp32, heavily tied) with one loud column per weight."""
    g = torch.Generator().manual_seed(11)
    scores = {n: torch.randint(-4, 9, shape, generator=g).float() / 4 for n, shape in SHAPES.items()}
    for s in scores.values():
        s[:, -1] += 4.0
    return scores


def caps_for(k: int) -> dict:
    from speft_ds.methods.speft.channel_cap import column_caps

    return column_caps(SHAPES, k / sum(r * c for r, c in SHAPES.values()), RATIO)


def _worker(rank, world_size, scores):
    from speft_ds.methods.speft.salience import ShardScores
    from speft_ds.methods.speft.selection import gather_indices, select_from_groups

    masks = {}
    for k in KS:
        shards = {}
        for name, weight in scores.items():
            flat = weight.flatten()
            size = math.ceil(flat.numel() / world_size)  # ZeRO-3's even split; the padding is not scored
            start = min(rank * size, flat.numel())
            shards[name] = ShardScores(start, flat[start:start + size].clone(), flat.numel(), 0)
        selected = select_from_groups(iter([shards]), list(scores), k=k, column_caps=caps_for(k))[0]
        masks[k] = dict(gather_indices(selected))
    return masks


@pytest.fixture(scope="module")
def masks(tmp_path_factory):
    root = tmp_path_factory.mktemp("channel_cap")
    return {world: run_ranks(_worker, world, planted_scores(), out_dir=root / str(world)) for world in (1, 2, 4)}


def test_shards_start_mid_row_and_one_rank_holds_nothing():
    starts = {n: [min(r * math.ceil(rows * cols / 4), rows * cols) for r in range(4)]
              for n, (rows, cols) in SHAPES.items()}
    assert any(start % SHAPES[n][1] for n, ss in starts.items() for start in ss)
    assert starts["w1"][-1] == 3  # w1's 3 elements on 4 ranks: the last rank holds none


@pytest.mark.parametrize("world", [1, 2, 4])
def test_every_rank_gets_the_reference_capped_mask(masks, world):
    scores = planted_scores()
    for k in KS:
        caps = caps_for(k)
        want, _ = reference_capped_top_k(list(scores.values()), [caps[n][0] for n in scores], k)
        for rank, rank_masks in enumerate(masks[world]):
            for i, (name, indices) in enumerate(rank_masks[k].items()):
                assert indices.tolist() == sorted(want[i]), f"k={k}, {name}, rank {rank} of {world}"


def test_the_cap_changed_the_mask():
    """Without the cap the loud columns would take these ks: the reference with no cap differs."""
    from tests.references import reference_top_k

    scores = planted_scores()
    plain, _ = reference_top_k([s.flatten() for s in scores.values()], 40)
    caps = caps_for(40)
    capped, _ = reference_capped_top_k(list(scores.values()), [caps[n][0] for n in scores], 40)
    assert plain != capped
