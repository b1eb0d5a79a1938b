"""The memory planner: its parameter counts against the real module trees, its model-state figures against
DeepSpeed's own ZeRO-3 estimator, and the effect of each setting in the expected direction."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
from torch import nn
from transformers import LlamaConfig

from speft_ds.config import METRIC_NAMES
from speft_ds.models.loading import skeleton_model
from speft_ds.runtime.memory_plan import (ACCUMULATOR_SETS, PRESETS, Job, ModelShape, NoSaliencePlanFits,
                                          choose_salience, contiguous_groups, plan, salience_groups, salience_time)

REPO = Path(__file__).resolve().parents[2]


def _meta_counts(preset: str) -> tuple[int, int, int]:
    model = skeleton_model(LlamaConfig(**PRESETS[preset]))
    total = sum(p.numel() for p in model.parameters())
    targeted = sum(m.weight.numel() for n, m in model.named_modules()
                   if isinstance(m, nn.Linear) and ".layers." in n)
    largest = max(m.weight.numel() for m in model.modules() if isinstance(m, (nn.Linear, nn.Embedding)))
    return total, targeted, largest


@pytest.mark.parametrize("preset", list(PRESETS))
def test_shapes_count_what_the_model_holds(preset):
    shape = ModelShape.from_config(PRESETS[preset])
    assert (shape.total, shape.targeted, shape.largest_module) == _meta_counts(preset)


@pytest.mark.parametrize("preset, world_size", [("llama-7b", 8), ("llama-70b", 64)])
def test_model_states_agree_with_deepspeeds_estimator_for_the_parts_both_count(preset, world_size):
    """DeepSpeed's estimate with the optimizer offloaded and the parameters on the GPU is the 16-bit
    parameter shard plus its largest-layer term (4 bytes per element of the largest layer); the planner's
    base weight shard and largest gathered module are the same quantities."""
    total, _, largest = _meta_counts(preset)
    _, gpu, largest_layer_memory = estimate_zero3_model_states_mem_needs(
        total, largest, num_gpus_per_node=8, num_nodes=world_size // 8, cpu_offload=True, cpu_offload_params=False)
    shape = ModelShape.from_config(PRESETS[preset])
    ours = plan(shape, Job(world_size=world_size, density=0.01, seq_len=2048, micro_batch=1, bf16=True))
    assert ours["training"]["base weight shard"] == pytest.approx(gpu - largest_layer_memory, rel=0.05)
    assert 4 * shape.largest_module == pytest.approx(largest_layer_memory, rel=0.05)


def test_settings_move_the_figures_the_way_they_should():
    shape = ModelShape.from_config(PRESETS["llama-7b"])
    base = Job(world_size=8, density=0.01, seq_len=2048, micro_batch=1)
    figures = plan(shape, base)
    more_ranks = plan(shape, Job(**{**base.__dict__, "world_size": 16}))
    assert more_ranks["training"]["base weight shard"] * 2 == pytest.approx(figures["training"]["base weight shard"], rel=1e-6)
    denser = plan(shape, Job(**{**base.__dict__, "density": 0.05}))
    assert denser["training"]["optimizer states"] == pytest.approx(5 * figures["training"]["optimizer states"], rel=1e-3)
    checkpointed = plan(shape, Job(**{**base.__dict__, "gradient_checkpointing": True}))
    assert checkpointed["training"]["activations"] < figures["training"]["activations"] / 4
    nf4 = plan(shape, Job(**{**base.__dict__, "quantize": "nf4"}))
    assert nf4["training"]["base weight shard"] < 0.35 * figures["training"]["base weight shard"]
    assert nf4["load"]["whole quantized base"] == pytest.approx(8 * nf4["training"]["base weight shard"], rel=1e-6)
    offloaded = plan(shape, Job(**{**base.__dict__, "offload_param": True, "offload_optimizer": True}))
    assert offloaded["training"]["base weight shard"] == 0 and offloaded["training host"]["offloaded base shard"] > 0
    for phase in ("salience", "training"):
        assert figures[phase]["peak"] == sum(v for k, v in figures[phase].items() if k != "peak")


def test_contiguous_groups_cover_every_weight_once_in_order_and_balance_sizes():
    sizes = [7, 1, 1, 9, 2, 2, 2, 30, 1, 5]
    for n in range(1, len(sizes) + 1):
        groups = contiguous_groups(sizes, n)
        assert len(groups) == n and all(len(g) > 0 for g in groups)
        assert [i for g in groups for i in g] == list(range(len(sizes)))
    # Each cut is where the running total comes closest to its share of the whole (60 here).
    assert contiguous_groups(sizes, 2) == [range(0, 7), range(7, 10)]  # 24 | 36: cutting after 30 would give 54
    assert contiguous_groups([1] * 12, 4) == [range(0, 3), range(3, 6), range(6, 9), range(9, 12)]
    with pytest.raises(ValueError):
        contiguous_groups(sizes, len(sizes) + 1)


def test_every_registered_metric_has_an_accumulator_count():
    assert set(ACCUMULATOR_SETS) == set(METRIC_NAMES)


def test_groups_cut_the_accumulators_and_the_backward_of_upper_groups():
    shape = ModelShape.from_config(PRESETS["llama-7b"])
    one = Job(world_size=2, density=0.01, seq_len=2048, micro_batch=1, gradient_checkpointing=True)
    four = Job(**{**one.__dict__, "salience_chunks": 4})
    accumulators = "salience accumulators (fp32, one group)"
    whole = plan(shape, one)["salience"][accumulators]
    largest_group = max(size for size, _ in salience_groups(shape, four))
    assert plan(shape, four)["salience"][accumulators] == -(-largest_group // 2) * 4 < whole / 3.5
    assert [lowest for _, lowest in salience_groups(shape, four)] == [0, 8, 16, 24]
    # 4 forwards, and backwards over 32, 24, 16 and 8 of the 32 layers (3 forwards' cost each with recompute)
    assert salience_time(shape, four) == pytest.approx((4 + 3 * (32 + 24 + 16 + 8) / 32) / 4)
    grasp = Job(**{**one.__dict__, "metric": "grasp"})
    assert plan(shape, grasp)["salience"][accumulators] == 3 * whole
    offloaded = plan(shape, Job(**{**one.__dict__, "salience_offload": True}))
    assert accumulators not in offloaded["salience"] and offloaded["salience host"][accumulators] == whole


def test_choose_salience_takes_the_fewest_groups_then_offload():
    shape = ModelShape.from_config(PRESETS["llama-7b"])
    job = Job(world_size=1, density=0.01, seq_len=2048, micro_batch=1, quantize="nf4", gradient_checkpointing=True)
    peaks = {n: plan(shape, Job(**{**job.__dict__, "salience_chunks": n}))["salience"]["peak"] for n in (1, 2, 3)}
    assert peaks[1] > peaks[2] > peaks[3]
    offload_host = plan(shape, Job(**{**job.__dict__, "salience_offload": True}))["salience host"]["peak"]
    chosen = choose_salience(shape, job, peaks[2], float("inf"), None, None, headroom=1.0)  # only offloaded
    assert (chosen.salience_chunks, chosen.salience_offload) == (1, True)
    chosen = choose_salience(shape, job, peaks[2], offload_host - 1, None, None, headroom=1.0)  # host too small
    assert (chosen.salience_chunks, chosen.salience_offload) == (2, False)
    chosen = choose_salience(shape, job, peaks[2] - 1, 0, None, False, headroom=1.0)
    assert chosen.salience_chunks == 3
    with pytest.raises(NoSaliencePlanFits):
        choose_salience(shape, Job(**{**job.__dict__, "metric": "grasp"}), peaks[2], 0, None, None)
    with pytest.raises(NoSaliencePlanFits):
        choose_salience(shape, job, 1.0, float("inf"), None, None)
    # By default a plan fills at most 90% of the budget: one group no longer fits its own peak.
    assert choose_salience(shape, job, peaks[1], 0, None, False, headroom=1.0).salience_chunks == 1
    assert choose_salience(shape, job, peaks[1], 0, None, False).salience_chunks == 2


def test_the_cli_prints_both_phases(tmp_path):
    proc = subprocess.run([sys.executable, "launch/plan.py", "--model", "llama-70b", "--world_size", "64",
                           "--quantize", "nf4", "--ds_config", "ds_configs/z3_cluster.json"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "salience (accelerator, per rank)" in proc.stdout and "training (accelerator, per rank)" in proc.stdout
    assert "whole quantized base" in proc.stdout
    chosen = subprocess.run([sys.executable, "launch/plan.py", "--model", "llama-7b", "--world_size", "1", "--quantize",
                             "nf4", "--gradient_checkpointing", "--max_memory_gib", "22.3", "--salience_offload", "none"],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert chosen.returncode == 0, chosen.stderr[-2000:]
    assert "2 groups of targeted weights, accumulators on the accelerator; about 1.62x" in chosen.stdout
    bad = subprocess.run([sys.executable, "launch/plan.py", "--model", str(tmp_path / "none"), "--world_size", "8"],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and bad.stderr.startswith("error: --model")
