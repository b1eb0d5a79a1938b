"""The planner counts a gathered copy of each weight ZeRO-3 fetches for a forward only where DeepSpeed
makes one: with several ranks, not with one (there the "gathered" weight is a view of its shard)."""

from __future__ import annotations

import deepspeed
import pytest
import torch
from torch import nn

from speft_ds.runtime.memory_plan import Job, ModelShape, plan
from speft_ds.runtime.zero3 import destroy_engine
from tests.distributed.harness import run_ranks

SHAPE = ModelShape(hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2, vocab=100)


def _weight_is_its_shard_during_forward(rank: int, world_size: int) -> bool:
    config = {"train_micro_batch_size_per_gpu": 1, "zero_allow_untested_optimizer": True,
              "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
    with deepspeed.zero.Init(config_dict_or_path=config):
        net = nn.Sequential(nn.Linear(64, 64, bias=False))
    engine, *_ = deepspeed.initialize(model=net, optimizer=torch.optim.SGD(net.parameters(), lr=0.1), config=config)
    seen = []
    # Registered after DeepSpeed's own pre-forward hook, so the weight is gathered when this one runs.
    net[0].register_forward_pre_hook(lambda m, _: seen.append(m.weight.data_ptr() == m.weight.ds_tensor.data_ptr()))
    engine(torch.randn(1, 64))
    destroy_engine(engine)
    return seen[0]


@pytest.mark.parametrize("world_size", [1, 2])
def test_gathered_copies_are_planned_where_deepspeed_makes_them(world_size, tmp_path):
    shares_shard = run_ranks(_weight_is_its_shard_during_forward, world_size, out_dir=tmp_path)
    planned = plan(SHAPE, Job(world_size=world_size, density=0.01, seq_len=16, micro_batch=1))
    for phase in ("salience", "training"):
        assert (planned[phase]["gathered layer + prefetch"] == 0) == all(shares_shard), (world_size, shares_shard)
