"""Single-process top-k selection against a plain-torch stable-sort reference."""

from __future__ import annotations

import pytest
import torch

from speft_ds.config import ConfigError
from speft_ds.methods.speft.salience import ShardScores
from speft_ds.methods.speft.selection import (RunningTopK, check_k, normalize_per_weight, num_to_select,
                                              select_from_groups, select_global, select_local, split_budget)
from speft_ds.methods.speft.selection_keys import score_keys

NAMES = ["a.q_proj", "a.v_proj", "b.down_proj", "b.up_proj"]


def whole(scores: torch.Tensor, start: int = 0, numel: int | None = None) -> ShardScores:
    """A single-process ShardScores: this process holds the whole (flat) weight."""
    n = scores.numel() if numel is None else numel
    return ShardScores(start=start, scores=scores, numel=n, accumulator_numel=scores.numel())


def reference_top_k(scores: dict[str, torch.Tensor], k: int, starts: dict[str, int] | None = None):
    """Top-k by (score descending, then module order, then flat index): a stable sort of the negated
    concatenation, whose positions are exactly (module order, flat index) order."""
    names = list(scores)
    flat = torch.cat([scores[n] for n in names])
    module_of = torch.cat([torch.full((scores[n].numel(),), i) for i, n in enumerate(names)])
    local_index = torch.cat([torch.arange(scores[n].numel()) for n in names])
    order = torch.sort(-flat, stable=True).indices[:k]
    result = {}
    for i, n in enumerate(names):
        picked = local_index[order][module_of[order] == i]
        result[n] = picked.sort().values + (starts or {}).get(n, 0)
    return result


def assert_same_selection(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], k: int):
    assert list(got) == list(expected), "the result must keep the input's module order"
    for name in expected:
        assert got[name].dtype == torch.int64
        assert torch.equal(got[name], expected[name]), name
    assert sum(t.numel() for t in got.values()) == k


def random_module_scores(gen: torch.Generator, kind: str) -> dict[str, torch.Tensor]:
    sizes = torch.randint(20, 120, (len(NAMES),), generator=gen).tolist()
    scores = {}
    for name, n in zip(NAMES, sizes):
        if kind == "random":
            s = torch.randn(n, generator=gen).abs()
        elif kind == "ties":  # integers in a small range: every value occurs in every module
            s = torch.randint(0, 4, (n,), generator=gen).float()
        elif kind == "signed_ties":  # negatives, zeros and positives, heavily tied
            s = torch.randint(-2, 3, (n,), generator=gen).float()
        elif kind == "magnitudes":  # widely spread exponents and signs
            s = torch.randn(n, generator=gen) * 10.0 ** torch.randint(-30, 30, (n,), generator=gen).float()
        else:
            raise ValueError(kind)
        scores[name] = s.to(torch.float32)
    return scores


def k_values(total: int, gen: torch.Generator) -> list[int]:
    return [1, 2, total // 3, int(torch.randint(1, total, (1,), generator=gen)), total - 1, total]


@pytest.mark.parametrize("kind", ["random", "ties", "signed_ties", "magnitudes"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_select_global_matches_reference(kind, seed):
    """select_global picks exactly the reference's k elements, for every k from 1 to all."""
    gen = torch.Generator().manual_seed(seed)
    scores = random_module_scores(gen, kind)
    shards = {n: whole(s) for n, s in scores.items()}
    total = sum(s.numel() for s in scores.values())
    for k in k_values(total, gen):
        assert_same_selection(select_global(shards, k), reference_top_k(scores, k), k)


def test_select_global_tie_at_threshold_spans_modules():
    """The k-th value is tied inside and across modules: the tie is broken by module order, then index."""
    gen = torch.Generator().manual_seed(42)
    scores = {n: torch.randint(0, 3, (50,), generator=gen).float() for n in NAMES}
    flat = torch.cat(list(scores.values()))
    descending = flat.sort(descending=True).values
    tested = 0
    for k in range(1, flat.numel()):
        threshold = descending[k - 1]
        tied_modules = [n for n, s in scores.items() if (s == threshold).any()]
        if descending[k] == threshold and len(tied_modules) > 1 and (flat > threshold).any():
            tested += 1
            assert_same_selection(select_global({n: whole(s) for n, s in scores.items()}, k),
                                  reference_top_k(scores, k), k)
    assert tested > 50  # the ties-at-the-k-th-value case was really exercised


def test_select_global_all_equal_and_zeros():
    """All-zero scores: the first k positions in module order win."""
    scores = {"m0": torch.zeros(7), "m1": torch.zeros(5), "m2": torch.zeros(9)}
    for k in range(1, 22):
        got = select_global({n: whole(s) for n, s in scores.items()}, k)
        assert_same_selection(got, reference_top_k(scores, k), k)
    got = select_global({n: whole(s) for n, s in scores.items()}, 9)
    assert got["m0"].tolist() == list(range(7)) and got["m1"].tolist() == [0, 1] and got["m2"].numel() == 0


def test_select_global_offsets_by_shard_start():
    """A ShardScores starting at flat index `start` returns indices into the whole weight (start + i)."""
    gen = torch.Generator().manual_seed(9)
    scores = {"x": torch.randn(40, generator=gen), "y": torch.randn(30, generator=gen)}
    starts = {"x": 100, "y": 0}
    shards = {"x": whole(scores["x"], start=100, numel=200), "y": whole(scores["y"])}
    for k in (1, 17, 70):
        assert_same_selection(select_global(shards, k), reference_top_k(scores, k, starts), k)


def test_select_global_rejects_bad_k_and_nan():
    scores = {"m": whole(torch.rand(10)), "n": whole(torch.rand(5))}
    for k in (0, -1, 16):
        with pytest.raises(ConfigError):
            select_global(scores, k)
    bad = torch.rand(10)
    bad[3] = float("nan")
    with pytest.raises(ConfigError):
        select_global({"m": whole(bad)}, 2)


@pytest.mark.parametrize("fraction", [1e-4, 0.013, 0.1, 0.37, 0.5, 1.0])
@pytest.mark.parametrize("kind", ["random", "ties", "signed_ties"])
def test_select_local_matches_per_module_reference(fraction, kind):
    """select_local takes each module's own quota of entries, each by the reference; a quota of 0 none."""
    gen = torch.Generator().manual_seed(17)
    scores = random_module_scores(gen, kind)
    quotas = {name: round(fraction * s.numel()) for name, s in scores.items()}
    got = select_local({n: whole(s) for n, s in scores.items()}, quotas)
    assert list(got) == list(scores)
    for name, s in scores.items():
        k_w = quotas[name]
        expected = reference_top_k({name: s}, k_w)[name] if k_w else torch.zeros(0, dtype=torch.int64)
        assert got[name].dtype == torch.int64
        assert torch.equal(got[name], expected), name
        assert got[name].numel() == k_w


def special_floats(gen: torch.Generator) -> torch.Tensor:
    tiny = torch.finfo(torch.float32).tiny
    fixed = torch.tensor([0.0, -0.0, 1.0, -1.0, tiny, -tiny, tiny / 8, -tiny / 8, 3.0e38, -3.0e38,
                          float("inf"), float("-inf"), 1e-45, -1e-45, 0.5, -0.5, 2.0, -2.0])
    spread = torch.randn(2000, generator=gen) * 10.0 ** torch.randint(-40, 38, (2000,), generator=gen).float()
    repeated = torch.randint(-5, 6, (200,), generator=gen).float()  # exact duplicates
    return torch.cat([fixed, spread.float(), repeated])


def test_score_keys_preserve_order():
    """Keys are int32 and order (as signed integers) exactly as the floats do; equal floats get equal keys
    (except -0.0 and 0.0, which may differ but stay between the negatives and the positives)."""
    values = special_floats(torch.Generator().manual_seed(0))
    keys = score_keys(values)
    assert keys.dtype == torch.int32
    keys = keys.long()  # differences below must not overflow

    ordered_values, order = values.sort(stable=True)
    ordered_keys = keys[order]
    value_up = ordered_values[1:] > ordered_values[:-1]
    value_eq = ordered_values[1:] == ordered_values[:-1]
    key_diff = ordered_keys[1:] - ordered_keys[:-1]
    assert bool((key_diff[value_up] > 0).all()), "a larger value got a key that is not larger"
    nonzero_eq = value_eq & (ordered_values[1:] != 0)
    assert bool((key_diff[nonzero_eq] == 0).all()), "equal values got different keys"
    # Sorting by key gives the same sequence of values as sorting by value.
    by_key = values[torch.sort(keys, stable=True).indices]
    assert torch.equal(by_key, ordered_values)
    # Both zeros sit above every negative and below every positive.
    zero_keys = score_keys(torch.tensor([0.0, -0.0]))
    assert int(zero_keys.min()) > int(keys[values < 0].max())
    assert int(zero_keys.max()) < int(keys[values > 0].min())


def test_num_to_select_and_check_k():
    """k = max(1, round(density * total)) unless num_trainable is given; k outside [1, total] is refused."""
    assert num_to_select(0.25, None, 40) == 10
    assert num_to_select(1e-9, None, 40) == 1
    assert num_to_select(1.0, None, 40) == 40
    assert num_to_select(0.5, 7, 40) == 7  # num_trainable overrides density
    for density, total in ((0.013, 1000), (0.37, 77)):
        assert num_to_select(density, None, total) == max(1, round(density * total))
    with pytest.raises(ConfigError):
        num_to_select(0.5, 41, 40)
    with pytest.raises(ConfigError):
        num_to_select(0.5, 0, 40)
    check_k(1, 1)
    check_k(40, 40)
    for k, total in ((0, 10), (11, 10), (-3, 10), (1, 0)):
        with pytest.raises(ConfigError):
            check_k(k, total)


def test_negative_zero_ties_with_zero():
    """-0.0 == 0.0 as scores, so position (lower flat index first) should break the tie."""
    scores = {"m": torch.tensor([-0.0, 0.0])}
    assert_same_selection(select_global({"m": whole(scores["m"])}, 1), reference_top_k(scores, 1), 1)


@pytest.mark.parametrize("kind", ["random", "ties", "signed_ties", "magnitudes"])
@pytest.mark.parametrize("seed", [0, 1])
def test_running_top_k_over_groups_matches_reference(kind, seed):
    """Scores offered group by group (each group's shards arriving together) give the reference's top k for
    every grouping of the modules, k from 1 to all: the ties decided by module order across groups."""
    gen = torch.Generator().manual_seed(seed)
    scores = random_module_scores(gen, kind)
    total = sum(s.numel() for s in scores.values())
    for k in k_values(total, gen):
        for cuts in ([1], [2], [3], [1, 2], [1, 3], [1, 2, 3]):
            bounds = [0, *cuts, len(NAMES)]
            top = RunningTopK(k, NAMES)
            for a, b in zip(bounds, bounds[1:]):
                top.add({n: whole(scores[n]) for n in NAMES[a:b]})
            assert_same_selection(top.selected(), reference_top_k(scores, k), k)


def test_select_from_groups_gives_the_global_or_local_selection_and_summary_of_one_pass():
    gen = torch.Generator().manual_seed(3)
    scores = random_module_scores(gen, "signed_ties")
    groups = [{n: whole(scores[n].clone()) for n in NAMES[:1]}, {n: whole(scores[n].clone()) for n in NAMES[1:]}]
    one = [{n: whole(scores[n].clone()) for n in NAMES}]
    for kwargs in (dict(k=40), dict(quotas={n: 3 + i for i, n in enumerate(NAMES)})):
        grouped, grouped_summary, _ = select_from_groups(iter(groups), NAMES, **kwargs)
        single, single_summary, _ = select_from_groups(iter(one), NAMES, **kwargs)
        assert grouped.keys() == single.keys() and all(torch.equal(grouped[n], single[n]) for n in NAMES)
        assert grouped_summary == single_summary
        assert grouped_summary["zero"] == sum(int((s == 0).sum()) for s in scores.values())
    expected = reference_top_k(scores, 40)
    assert_same_selection(select_from_groups(iter(groups), NAMES, k=40)[0], expected, 40)
    assert select_from_groups(iter(groups), NAMES, k=40)[1]["lowest_selected"] == min(
        scores[n][expected[n]].min().item() for n in NAMES if expected[n].numel())


@pytest.mark.parametrize("total,sizes,expected", [
    (10, [1, 1, 1], [4, 3, 3]),             # equal remainders: the earlier weight first
    (7, [100, 300, 600], [1, 2, 4]),         # 0.7, 2.1, 4.2: the largest remainder (0.7) gets the extra one
    (1, [5, 5], [1, 0]),                     # fewer than the weights: some get none
    (5, [1, 2, 3, 4], [1, 1, 1, 2]),        # 0.5, 1, 1.5, 2: the two halves tie, the earlier one wins
])
def test_split_budget_is_exact_by_largest_remainder(total, sizes, expected):
    assert split_budget(total, sizes) == expected
    assert sum(expected) == total


def test_excluded_entries_are_never_selected():
    scores = {n: torch.arange(10, dtype=torch.float32) for n in NAMES}
    best = {n: torch.tensor([9, 8]) for n in NAMES}
    groups = [{n: whole(scores[n].clone())} for n in NAMES]
    selected, _, _ = select_from_groups(iter(groups), NAMES, k=8, excluded=best)
    assert all(torch.equal(selected[n], torch.tensor([6, 7])) for n in NAMES)


def test_running_top_k_refuses_more_than_it_was_offered():
    top = RunningTopK(11, NAMES[:1])
    top.add({NAMES[0]: whole(torch.ones(10))})
    with pytest.raises(ConfigError, match="k = 11 is outside"):
        top.selected()


def _over_mean_magnitude(scores: torch.Tensor) -> torch.Tensor:
    return scores / (scores.abs().sum(dtype=torch.float64).item() / scores.numel())


def test_normalized_selection_is_the_top_k_of_each_weights_scores_over_their_mean_magnitude():
    gen = torch.Generator().manual_seed(4)
    scores = random_module_scores(gen, "random")
    scores["b.down_proj"] *= 1000.0  # one weight's scores run far larger than the others'
    k = 40
    one_pass = [{n: whole(scores[n].clone()) for n in NAMES}]
    plain = select_from_groups(iter(one_pass), NAMES, k=k)[0]
    assert plain["b.down_proj"].numel() == min(k, scores["b.down_proj"].numel())  # it takes what it can of k
    expected = reference_top_k({n: _over_mean_magnitude(s) for n, s in scores.items()}, k)
    for grouping in (one_pass, [{n: whole(scores[n].clone())} for n in NAMES]):
        assert_same_selection(select_from_groups(iter(grouping), NAMES, k=k, normalize=True)[0], expected, k)
    assert 0 < expected["b.down_proj"].numel() < k


def test_normalizing_leaves_an_all_zero_weight_as_it_is():
    shards = {"a": whole(torch.zeros(5)), "b": whole(torch.tensor([1.0, -3.0]))}
    normalize_per_weight(shards)
    assert torch.equal(shards["a"].scores, torch.zeros(5))
    assert torch.equal(shards["b"].scores, torch.tensor([0.5, -1.5]))


def test_score_summary_matches_numpy_histograms():
    """The summary's counts against numpy's histogram of log10 |score| on the same edges, split by sign, with
    the out-of-range magnitudes clamped into the end bins and zeros counted apart."""
    import numpy as np

    torch.manual_seed(0)
    a = torch.randn(3000) * torch.logspace(-14, 6, 3000)  # reaches past both ends of the range
    b = torch.cat([torch.zeros(17), torch.randn(500)])
    scores = {"a.q_proj": a, "a.v_proj": b}
    _, summary, _ = select_from_groups([{n: whole(s.clone()) for n, s in scores.items()}], list(scores), k=10)

    edges = np.array(summary["log10_edges"])
    flat = torch.cat([a, b]).double().numpy()
    for sign, key in ((1, "positive"), (-1, "negative")):
        logs = np.log10(np.abs(flat[np.sign(flat) == sign]))
        expected, _ = np.histogram(np.clip(logs, edges[0], edges[-1] - 1e-6), bins=edges)
        assert summary[key] == expected.tolist(), key
    assert summary["zero"] == 17
    assert summary["lowest_selected"] == torch.cat([a, b]).topk(10).values.min().item()
