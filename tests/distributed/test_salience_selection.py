"""Salience and selection on 2 real ZeRO-3 ranks (gloo) against a dense single-process reference.

The reference is plain torch autograd on the unpartitioned model, one unpadded example at a time; it
shares no code with speft_ds.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from fractions import Fraction

import deepspeed
import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from speft_ds.runtime.zero3 import destroy_engine
from tests.distributed.harness import run_ranks
from tests.models import write_tiny_llama
from tests.references import (MICRO_BATCH, dense_gradient, random_examples, reference_capped_top_k, reference_top_k,
                              zero3_config)

DENSITY = 0.05
RANDOM_FRACTION = 0.5  # --random_fraction
SEED = 3
CAP_RATIO = 1.5  # --input_channel_cap: each column keeps ceil(1.5 x its even share) selectable


# Every collective of torch.distributed that moves tensors.
COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_object", "broadcast",
               "broadcast_object_list", "reduce", "reduce_scatter", "reduce_scatter_tensor", "all_to_all",
               "all_to_all_single", "gather", "scatter", "send", "recv", "isend", "irecv")
EDGE_TARGETS = "embed_tokens,lm_head,q_proj"  # named targets beyond the default decoder linears


def _salience_and_selection(model_dir: str, examples: list[dict], rank: int, world_size: int):
    from speft_ds.config import TrainConfig
    from speft_ds.data.batches import rank_batches
    from speft_ds.methods.speft.channel_cap import column_caps
    from speft_ds.methods.speft.salience import ShardScores, compute_salience
    from speft_ds.methods.speft.random_share import joined, random_picks, random_quotas
    from speft_ds.methods.speft.selection import (gather_indices, num_to_select, select_from_groups, select_global,
                                                  select_local, split_budget)
    from speft_ds.models.loading import find_targets, load_model

    model, hf_ds_config = load_model(TrainConfig(model=model_dir), zero3_config(world_size), torch.float32)
    engine = deepspeed.initialize(model=model, config=zero3_config(world_size))[0]
    targets = find_targets(model, None)
    batches = rank_batches(examples, list(range(len(examples))), rank, world_size, MICRO_BATCH, pad_id=0)

    base_state_during = []
    probe = model.model.norm.register_forward_hook(lambda *_: base_state_during.append(
        any(p.requires_grad or p.grad is not None for p in model.parameters())))
    scores = compute_salience(model, targets, batches, "gradient", show_progress=False)
    probe.remove()
    base_state_after = any(p.requires_grad or p.grad is not None for p in model.parameters())

    k = num_to_select(DENSITY, None, sum(s.numel for s in scores.values()))
    shapes = {n: tuple(m.weight.ds_shape) for n, m in targets.items()}
    with counting_collectives() as sent:
        selected = select_global(scores, k)
    quotas = dict(zip(scores, split_budget(k, [s.numel for s in scores.values()])))
    shares = random_quotas(quotas, RANDOM_FRACTION)
    picks = random_picks(targets, shares, SEED)
    rest = select_from_groups(iter([{n: ShardScores(s.start, s.scores.clone(), s.numel, 0) for n, s in scores.items()}]),
                              list(scores), k=k - sum(shares.values()), excluded=picks)[0]
    random_scores = compute_salience(model, targets, batches, "random", seed=SEED, show_progress=False)
    edge_scores = compute_salience(model, find_targets(model, EDGE_TARGETS), batches, "gradient", show_progress=False)
    result = {
        "edge_scores": {n: (s.start, s.scores.clone()) for n, s in edge_scores.items()},
        "k": k,
        "selection_collectives": sent,
        "scores": {n: (s.start, s.scores.clone(), s.numel, s.accumulator_numel) for n, s in scores.items()},
        "partition": {n: (m.weight.numel(), m.weight.ds_numel, m.weight.ds_tensor.numel()) for n, m in targets.items()},
        "global": dict(gather_indices(selected)),
        "local": dict(gather_indices(select_local(scores, quotas))),
        "mixed": dict(gather_indices(joined(picks, rest))),
        "random_scores": {n: (s.start, s.scores.clone()) for n, s in random_scores.items()},
        "capped": dict(gather_indices(select_from_groups(
            iter([{n: ShardScores(s.start, s.scores.clone(), s.numel, 0) for n, s in scores.items()}]), list(scores),
            k=k, column_caps=column_caps(shapes, k / sum(s.numel for s in scores.values()), CAP_RATIO))[0])),
        "shapes": shapes,
        "normalized": dict(gather_indices(select_from_groups(
            iter([{n: ShardScores(s.start, s.scores.clone(), s.numel, 0) for n, s in scores.items()}]), list(scores),
            k=k, normalize=True)[0])),
        "base_state_during": base_state_during,
        "base_state_after": base_state_after,
    }
    destroy_engine(engine)
    del hf_ds_config
    return result


@contextmanager
def counting_collectives():
    """{collective: [calls, bytes of its tensors]} for every torch.distributed collective called inside,
    however it is reached (the calls still run)."""
    import torch.distributed as dist

    sent = {}
    originals = {name: getattr(dist, name) for name in COLLECTIVES}

    def counted(name):
        def call(*args, **kwargs):
            tensors = [t for a in args for t in (a if isinstance(a, list) else [a]) if torch.is_tensor(t)]
            calls, size = sent.get(name, (0, 0))
            sent[name] = (calls + 1, size + sum(t.numel() * t.element_size() for t in tensors))
            return originals[name](*args, **kwargs)
        return call

    for name in COLLECTIVES:
        setattr(dist, name, counted(name))
    try:
        yield sent
    finally:
        for name, original in originals.items():
            setattr(dist, name, original)


def _worker(rank, world_size, model_dir, deep_model_dir, examples):
    result = _salience_and_selection(model_dir, examples, rank, world_size)
    deep = _salience_and_selection(deep_model_dir, examples, rank, world_size)
    result["deep_selection_collectives"] = deep["selection_collectives"]
    result["deep_k"] = deep["k"]
    return result


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("salience")
    model_dir = write_tiny_llama(root / "llama2", num_layers=2)
    deep_dir = write_tiny_llama(root / "llama8", num_layers=8)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    examples = random_examples(model.config.vocab_size)
    two = run_ranks(_worker, 2, str(model_dir), str(deep_dir), examples, out_dir=root / "two")
    one = run_ranks(_worker, 1, str(model_dir), str(deep_dir), examples, out_dir=root / "one")
    return {"model": model, "examples": examples, "two": two, "one": one}


@pytest.fixture(scope="module")
def reference(setup):
    names = [n for n, m in setup["model"].named_modules() if isinstance(m, nn.Linear) and n != "lm_head"]
    return {n: g.abs() for n, g in dense_gradient(setup["model"], setup["examples"], names).items()}


def test_embedding_and_lm_head_targets_match_dense_reference(setup):
    names = ["model.embed_tokens", "model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj", "lm_head"]
    reference = {n: g.abs() for n, g in dense_gradient(setup["model"], setup["examples"], names).items()}
    for rank_result in setup["two"]:
        assert list(rank_result["edge_scores"]) == names
        for name, (start, scores) in rank_result["edge_scores"].items():
            ref = reference[name]
            torch.testing.assert_close(scores, ref[start:start + scores.numel()], rtol=1e-5,
                                       atol=1e-5 * ref.abs().max().item())


def test_targets_are_really_partitioned(setup):
    for name, (local_numel, full_numel, shard) in setup["two"][0]["partition"].items():
        assert local_numel == 0, f"{name} is not partitioned"
        assert shard == math.ceil(full_numel / 2)
    assert any(full % 2 for _, full, _ in setup["two"][0]["partition"].values()), "no padded partition exercised"


def test_no_base_gradient_state_and_shard_sized_accumulators(setup):
    for rank_result in setup["two"]:
        assert rank_result["base_state_during"] and not any(rank_result["base_state_during"])
        assert not rank_result["base_state_after"]
        for name, (_, _, _, acc_numel) in rank_result["scores"].items():
            assert acc_numel == rank_result["partition"][name][2]


@pytest.mark.parametrize("world", ["two", "one"])
def test_salience_shards_match_dense_reference(setup, reference, world):
    for rank, rank_result in enumerate(setup[world]):
        for name, (start, scores, numel, _) in rank_result["scores"].items():
            ref = reference[name]
            assert numel == ref.numel()
            assert start == rank * math.ceil(numel / len(setup[world]))
            torch.testing.assert_close(scores, ref[start:start + scores.numel()], rtol=1e-5,
                                       atol=1e-5 * ref.abs().max().item())
    covered = sum(r["scores"]["model.layers.0.mlp.down_proj"][1].numel() for r in setup[world])
    assert covered == reference["model.layers.0.mlp.down_proj"].numel()


def _assert_same_but_near_ties(got: set, want: set, ref_scores: torch.Tensor, kth: float) -> None:
    for index in got ^ want:
        assert abs(ref_scores[index].item() - kth) <= 1e-5 * abs(kth), f"index {index} is not a near-tie"


def test_global_selection_is_exact_and_matches_reference(setup, reference):
    names = list(reference)
    k = setup["two"][0]["k"]
    want, kth = reference_top_k([reference[n] for n in names], k)
    for world in ("two", "one"):
        for rank_result in setup[world]:
            got = rank_result["global"]
            assert sum(t.numel() for t in got.values()) == k
            for i, name in enumerate(names):
                indices = got[name]
                assert torch.equal(indices, indices.sort().values) and indices.unique().numel() == indices.numel()
                _assert_same_but_near_ties(set(indices.tolist()), want[i], reference[name], kth)
    for name in names:  # 1 rank and 2 ranks agree but for near-ties
        _assert_same_but_near_ties(set(setup["one"][0]["global"][name].tolist()),
                                   set(setup["two"][0]["global"][name].tolist()), reference[name], kth)


def test_normalized_selection_matches_reference(setup, reference):
    names = list(reference)
    normalized = [reference[n] / (reference[n].sum(dtype=torch.float64).item() / reference[n].numel()) for n in names]
    k = setup["two"][0]["k"]
    want, kth = reference_top_k(normalized, k)
    for world in ("two", "one"):
        got = setup[world][0]["normalized"]
        assert sum(t.numel() for t in got.values()) == k
        for i, name in enumerate(names):
            _assert_same_but_near_ties(set(got[name].tolist()), want[i], normalized[i], kth)


@pytest.mark.parametrize("world", ["two", "one"])
def test_capped_selection_on_zero3_shards_matches_reference(setup, world):
    """The cap per input channel, on the ranks' real ZeRO-3 shards, against the dense reference on the very
    scores the ranks held (their shards joined): exact, with no float near-ties to allow for."""
    ranks = setup[world]
    shapes, k = ranks[0]["shapes"], ranks[0]["k"]
    names = list(shapes)
    whole = [torch.cat([r["scores"][n][1] for r in ranks]).view(shapes[n]) for n in names]
    fraction = k / sum(w.numel() for w in whole)
    caps = [math.ceil(CAP_RATIO * fraction * rows) for rows, _ in shapes.values()]
    want, _ = reference_capped_top_k(whole, caps, k)
    plain, _ = reference_top_k([w.flatten() for w in whole], k)
    assert want != plain  # the cap moved entries
    for rank_result in ranks:
        got = rank_result["capped"]
        assert sum(t.numel() for t in got.values()) == k
        for i, name in enumerate(names):
            assert got[name].tolist() == sorted(want[i]), name


def largest_remainder(total: int, sizes: list[int]) -> list[int]:
    """The reference split: floor shares, then one more to the largest remainders (the earlier on a tie)."""
    exact = [Fraction(total * size, sum(sizes)) for size in sizes]
    parts = [math.floor(x) for x in exact]
    for i in sorted(range(len(sizes)), key=lambda i: (parts[i] - exact[i], i))[:total - sum(parts)]:
        parts[i] += 1
    return parts


def test_local_selection_splits_k_exactly_and_matches_reference(setup, reference):
    k = setup["two"][0]["k"]
    quotas = largest_remainder(k, [ref.numel() for ref in reference.values()])
    assert sum(quotas) == k and len(set(quotas)) > 1  # weights of different sizes get different shares
    for (name, ref), quota in zip(reference.items(), quotas):
        (want,), kth = reference_top_k([ref], quota)
        for world in ("two", "one"):
            got = setup[world][0]["local"][name]
            assert got.numel() == quota
            _assert_same_but_near_ties(set(got.tolist()), want, ref, kth)


def test_random_share_then_scores_match_reference(setup, reference):
    """--random_fraction 0.5: each weight's share of round(0.5 k) (split in proportion to its quota of k) is
    its top entries by `--metric random`'s scores; the rest is the global top of the gradient over every
    entry not already taken. The same on 1 and 2 ranks."""
    names, k = list(reference), setup["two"][0]["k"]
    quotas = largest_remainder(k, [reference[n].numel() for n in names])
    shares = largest_remainder(round(RANDOM_FRACTION * k), quotas)
    random_scores = {n: torch.cat([r["random_scores"][n][1] for r in setup["two"]]) for n in names}
    picked = [reference_top_k([random_scores[n]], share)[0][0] for n, share in zip(names, shares)]
    rest = [torch.tensor([float("-inf") if i in taken else v for i, v in enumerate(reference[n].tolist())])
            for n, taken in zip(names, picked)]
    want, kth = reference_top_k(rest, k - sum(shares))
    for world in ("two", "one"):
        got = setup[world][0]["mixed"]
        assert sum(t.numel() for t in got.values()) == k
        for i, name in enumerate(names):
            indices = set(got[name].tolist())
            assert picked[i] <= indices, name
            _assert_same_but_near_ties(indices - picked[i], want[i], reference[name], kth)
    for name in names:
        assert torch.equal(random_scores[name], torch.cat([r["random_scores"][name][1] for r in setup["one"]]))


def test_selection_communication_does_not_grow_with_depth(setup):
    """Counted at torch.distributed itself: two int64 counts (NaN check, elements offered), the two
    2^16-bin int64 histograms of the score keys' halves, and seven 256-bin rounds over the 56-bit
    position keys that break ties; the same on 2 and 8 layers (4x the k)."""
    want = {"all_reduce": (2 + 2 + 7, 2 * 8 + 2 * 65536 * 8 + 7 * 256 * 8)}
    for rank_result in setup["two"]:
        assert rank_result["deep_k"] > 3 * rank_result["k"]
        assert rank_result["selection_collectives"] == want
        assert rank_result["deep_selection_collectives"] == want
    assert setup["one"][0]["selection_collectives"] == {}  # one rank: nothing to exchange
