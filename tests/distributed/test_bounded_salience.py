"""The salience pass in groups of weights (--salience_chunks) and with host-memory accumulators
(--salience_offload) on 2 real ZeRO-3 ranks: the mask equals the one-pass mask bit for bit, ties included,
and, with a k that cuts through the non-zero scores, the dense single-process reference's top-k (gradient
and snip; with each shard's scores flipped the latter fails).

The model has input-norm dimensions set to zero, so the columns of q/k/v/gate/up that read them get an
exactly zero gradient: with k above the count of non-zero scores, the k-th score is a tie at 0 shared by
weights in several groups, which only the position rule (earlier weight, then lower flat index) decides.
"""

from __future__ import annotations

import deepspeed
import pytest
import torch
from safetensors.torch import load_file, save_file

from speft_ds.runtime.memory_plan import contiguous_groups
from tests.distributed.harness import run_ranks
from tests.models import write_tiny_llama
from tests.references import MICRO_BATCH, decoder_linears, dense_gradient, random_examples, reference_top_k, \
    zero3_config

ZEROED_DIMS = [1, 5, 6, 20]
# (chunks, offload): 2 and 3 groups of uneven size, the offload path alone and with groups
PLANS = [(2, False), (3, False), (1, True), (3, True)]


def _zero_norm_dims(model_dir) -> None:
    weights = load_file(model_dir / "model.safetensors")
    for name, tensor in weights.items():
        if name.endswith("layernorm.weight"):
            tensor[ZEROED_DIMS] = 0.0
    save_file(weights, str(model_dir / "model.safetensors"), metadata={"format": "pt"})


def _masks(rank, world_size, model_dir, examples, metric, quantize, k, plans, checkpointing=False):
    """Per salience plan: every weight's whole selected index list, and the summary."""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    from speft_ds.config import TrainConfig
    from speft_ds.data.batches import rank_batches
    from speft_ds.methods.speft.salience import score_groups
    from speft_ds.methods.speft.selection import gather_indices, select_from_groups
    from speft_ds.models.loading import block_of, decoder_blocks, find_targets, load_model
    from speft_ds.runtime import zero3
    from speft_ds.runtime.ds_config import salience_ds_config

    config = TrainConfig(model=model_dir, quantize=quantize, gradient_checkpointing=checkpointing)
    model, hf_ds_config = load_model(config, zero3_config(world_size), torch.float32)
    engine = deepspeed.initialize(model=model, config=salience_ds_config(zero3_config(world_size)))[0]
    targets = find_targets(model, None)
    block_modules = decoder_blocks(model)
    blocks = list(block_modules)
    recording = set()  # decoder blocks whose input asked for gradients in the pass now running

    def watch(position):
        def hook(module, args, kwargs):
            if (args[0] if args else kwargs["hidden_states"]).requires_grad:
                recording.add(position)
        return hook

    for position, block in enumerate(block_modules.values()):
        block.register_forward_pre_hook(watch(position), with_kwargs=True)

    def per_group(passes, autograd):
        for scores in passes:
            autograd.append(sorted(recording))
            recording.clear()
            yield scores

    names = list(targets)
    sizes = [zero3.full_numel(m.weight) for m in targets.values()]
    batches = rank_batches(examples, list(range(len(examples))), rank, world_size, MICRO_BATCH, pad_id=0)
    result = {}
    for chunks, offload in plans:
        groups = [[names[i] for i in run] for run in contiguous_groups(sizes, chunks)]
        autograd = []
        scores = score_groups(model, targets, groups, batches, metric, show_progress=False, offload=offload,
                              release=engine.empty_partition_cache)
        selected, summary, _ = select_from_groups(per_group(scores, autograd), names, k=k)
        lowest = [min(blocks.index(block_of(name, block_modules)) for name in group) for group in groups]
        result[(chunks, offload)] = {"masks": dict(gather_indices(selected)), "summary": summary,
                                     "groups": groups, "autograd_blocks": autograd,
                                     "blocks_from_lowest": [list(range(low, len(blocks))) for low in lowest],
                                     "left_gathered": [n for n, p in model.named_parameters()
                                                       if p.ds_status == ZeroParamStatus.AVAILABLE]}
    zero3.destroy_engine(engine)
    del hf_ds_config
    return result


@pytest.fixture(scope="module")
def tied_model(tmp_path_factory):
    model_dir = write_tiny_llama(tmp_path_factory.mktemp("bounded") / "llama")
    _zero_norm_dims(model_dir)
    return model_dir


def _reference_gradient(model_dir, examples):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    names = decoder_linears(model)
    return names, dense_gradient(model, examples, names)


def _assert_same_masks(result: dict, baseline: tuple, others: list[tuple]) -> None:
    want = result[baseline]
    for plan in others:
        got = result[plan]
        # Every pass hands its gathered weights back (its lowest block's too, though nothing below asks for them).
        assert got["left_gathered"] == [], f"{plan}: weights left gathered after the pass: {got['left_gathered']}"
        # Blocks below a group's lowest one run as in inference: autograd keeps nothing of theirs.
        assert got["autograd_blocks"] == got["blocks_from_lowest"], f"{plan}: autograd recorded other blocks"
        assert list(got["masks"]) == list(want["masks"])
        for name in want["masks"]:
            assert torch.equal(got["masks"][name], want["masks"][name]), f"{plan}: {name} differs from one pass"
        assert got["summary"] == want["summary"], f"{plan}: score summary differs from one pass"


@pytest.mark.parametrize("metric", ["gradient", "snip"])
def test_grouped_and_offloaded_masks_equal_one_pass_with_a_tie_across_groups(tied_model, tmp_path, metric):
    examples = random_examples(100)
    names, grad = _reference_gradient(tied_model, examples)
    tied = {n: set(torch.nonzero(g == 0).view(-1).tolist()) for n, g in grad.items()}  # |g| = |W g| = 0
    zero = sum(len(t) for t in tied.values())
    assert zero > 600, "the zeroed norm dimensions should give many exactly-zero gradients"
    k = sum(g.numel() for g in grad.values()) - zero + zero // 2  # the k-th score is a tie at 0
    ranks = run_ranks(_masks, 2, str(tied_model), examples, metric, None, k, [(1, False), *PLANS], out_dir=tmp_path)
    for result in ranks:
        _assert_same_masks(result, (1, False), PLANS)
    masks = {n: set(t.tolist()) for n, t in ranks[0][(1, False)]["masks"].items()}
    assert sum(map(len, masks.values())) == k
    if metric == "gradient":
        want, kth = reference_top_k([grad[n].abs() for n in names], k)
        assert kth == 0.0 and [masks[n] for n in names] == want
    # The tie is split by position, and its entries lie in more than one group of every grouping.
    assert 0 < sum(len(masks[n] & tied[n]) for n in names) < zero
    for chunks, _ in PLANS:
        groups = ranks[0][(chunks, False if chunks > 1 else True)]["groups"]
        assert len({g for g, members in enumerate(groups) for n in members if tied[n]}) > 1 or chunks == 1
    sizes = [sum(grad[n].numel() for n in members) for members in ranks[0][(3, False)]["groups"]]
    assert len(set(sizes)) > 1, "the groups should be of uneven size"


def _near_ties_only(got: set, want: set, scores: torch.Tensor, kth: float) -> None:
    """The same entries but where accumulation order moves a score across the k-th by rounding."""
    for index in got ^ want:
        assert abs(scores[index].item() - kth) <= 1e-5 * kth, f"index {index} ({scores[index]}) is not a near-tie"


@pytest.mark.parametrize("metric", ["gradient", "snip"])
def test_grouped_and_offloaded_masks_cutting_through_nonzero_scores_match_the_dense_reference(tied_model, tmp_path,
                                                                                             metric):
    """k a quarter of the non-zero scores: which entries win depends on every score's value, so a wrong or
    permuted score in any group or in the host copy changes the mask (the headline case above selects every
    non-zero score whatever its value)."""
    from transformers import AutoModelForCausalLM

    examples = random_examples(100)
    names, grad = _reference_gradient(tied_model, examples)
    weights = {n: m.weight.detach().flatten() for n, m in AutoModelForCausalLM.from_pretrained(tied_model).named_modules()
               if n in grad}
    scores = {n: (grad[n] * weights[n]).abs() if metric == "snip" else grad[n].abs() for n in names}
    k = sum(int((s > 0).sum()) for s in scores.values()) // 4
    ranks = run_ranks(_masks, 2, str(tied_model), examples, metric, None, k, [(1, False), *PLANS], out_dir=tmp_path)
    want, kth = reference_top_k([scores[n] for n in names], k)
    assert kth > 0
    for result in ranks:
        _assert_same_masks(result, (1, False), PLANS)
        for name, chosen in zip(names, want):
            _near_ties_only(set(result[(1, False)]["masks"][name].tolist()), chosen, scores[name], kth)


def test_groups_under_gradient_checkpointing_equal_one_pass_without_it(tied_model, tmp_path):
    examples = random_examples(100)
    plain = run_ranks(_masks, 2, str(tied_model), examples, "gradient", None, 500, [(1, False)],
                      out_dir=tmp_path / "plain")
    checkpointed = run_ranks(_masks, 2, str(tied_model), examples, "gradient", None, 500, [(1, False), (3, False)],
                             True, out_dir=tmp_path / "checkpointed")
    for a, b in zip(plain, checkpointed):
        b[("plain", False)] = a[(1, False)]
        _assert_same_masks(b, ("plain", False), [(1, False), (3, False)])


def test_grouped_masks_of_an_nf4_base_equal_one_pass(tmp_path):
    model_dir = write_tiny_llama(tmp_path / "llama", hidden_size=36, intermediate_size=48)
    ranks = run_ranks(_masks, 2, str(model_dir), random_examples(100), "gradient", "nf4", 400,
                      [(1, False), (2, False), (3, True)], out_dir=tmp_path / "ranks")
    for result in ranks:
        _assert_same_masks(result, (1, False), [(2, False), (3, True)])
        assert sum(t.numel() for t in result[(1, False)]["masks"].values()) == 400
