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

from speft_ds.memory_plan import PRESETS, Job, ModelShape, plan
from speft_ds.model import skeleton_model

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
    assert offloaded["training"]["base weight shard"] == 0 and offloaded["host"]["offloaded base shard"] > 0
    for phase in ("salience", "training"):
        assert figures[phase]["peak"] == sum(v for k, v in figures[phase].items() if k != "peak")


def test_the_cli_prints_both_phases(tmp_path):
    proc = subprocess.run([sys.executable, "launch/plan.py", "--model", "llama-70b", "--world_size", "64",
                           "--quantize", "nf4", "--ds_config", "ds_configs/z3_cluster.json"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "salience (per rank)" in proc.stdout and "training (per rank)" in proc.stdout
    assert "whole quantized base" in proc.stdout
    bad = subprocess.run([sys.executable, "launch/plan.py", "--model", str(tmp_path / "none"), "--world_size", "8"],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and bad.stderr.startswith("error: --model")
