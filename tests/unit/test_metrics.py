"""Salience metric formulas on one process, against the paper's definitions written out in plain torch."""

from __future__ import annotations

import pytest
import torch

from speft_ds.config import METRIC_NAMES, WEIGHT_FREE_METRICS
from speft_ds.methods.speft.salience import METRICS, ShardStats


def test_cli_metric_names_are_the_registered_metrics():
    assert METRIC_NAMES == tuple(METRICS)  # the same names, once each, in the order --help lists them
    assert set(WEIGHT_FREE_METRICS) == {name for name, metric in METRICS.items() if not metric.reads_weight}


def test_weight_free_metrics_score_without_the_weight(stats):
    for name in WEIGHT_FREE_METRICS:
        with_weight = METRICS[name].score(stats)
        without = METRICS[name].score(ShardStats(stats.name, stats.start, stats.size, None, stats.seed,
                                                 grad=stats.grad, grad_sq=stats.grad_sq, input_norm=stats.input_norm,
                                                 example_grad_sum=stats.example_grad_sum,
                                                 example_grad_sq_sum=stats.example_grad_sq_sum,
                                                 general_grad_sq=stats.general_grad_sq))
        torch.testing.assert_close(without, with_weight, rtol=0, atol=0, msg=name)


@pytest.fixture
def stats():
    g = torch.Generator().manual_seed(3)
    w, grad, grad_sq, syn, hg, sums, squares, general = (torch.randn(50, generator=g) for _ in range(8))
    squares[3] = 0.0  # an entry with no gradient at all: the floor under the denominator keeps it finite
    # a weight of 8 input channels: the shard's elements 10..59 start at channel 2 of row 1
    return ShardStats("model.layers.0.mlp.up_proj", 10, 50, w, seed=7, grad=grad, grad_sq=grad_sq.abs(),
                      synflow_grad=syn.abs(), hessian_grad=hg, input_norm=torch.arange(1.0, 9.0),
                      example_grad_sum=sums, example_grad_sq_sum=squares.square(), general_grad_sq=general.square())


def test_formulas(stats):
    w, g = stats.weight, stats.grad
    expected = {
        "magnitude": w.abs(), "gradient": g.abs(), "snip": (w * g).abs(), "force": -(w * g),
        "taylor": (w * g) ** 2, "fisher": stats.grad_sq, "synflow": (w.abs() * stats.synflow_grad).abs(),
        "grasp": -(stats.hessian_grad * w),
        "gradient_over_input": g.abs() / torch.tensor([float(1 + (10 + i) % 8) for i in range(50)]),
        # each ratio's denominator floored at 1e-8 of its largest entry (one process: this shard's)
        "gradient_snr": stats.example_grad_sum.abs() / (stats.example_grad_sq_sum
                                                         + 1e-8 * stats.example_grad_sq_sum.max()).sqrt(),
        "gradient_over_fisher": g.abs() / (stats.general_grad_sq + 1e-8 * stats.general_grad_sq.max()).sqrt(),
    }
    for name, want in expected.items():
        torch.testing.assert_close(METRICS[name].score(stats), want, msg=name)


def test_random_scores_depend_only_on_seed_name_and_flat_index(stats):
    whole = METRICS["random"].score(ShardStats(stats.name, 0, 100, None, seed=7))
    part = METRICS["random"].score(stats)  # elements 10..59 of the same weight
    torch.testing.assert_close(part, whole[10:60], rtol=0, atol=0)
    assert ((whole >= 0) & (whole < 1)).all() and whole.unique().numel() > 95
    other_seed = METRICS["random"].score(ShardStats(stats.name, 0, 100, None, seed=8))
    other_name = METRICS["random"].score(ShardStats("model.layers.1.mlp.up_proj", 0, 100, None, seed=7))
    assert not torch.equal(whole, other_seed) and not torch.equal(whole, other_name)
    big = METRICS["random"].score(ShardStats(stats.name, 2**33, 100, None, seed=7))
    assert not torch.equal(whole, big)  # flat indices above 2^32 do not wrap onto low ones
