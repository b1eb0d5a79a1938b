"""A finished run releases what DeepSpeed keeps of its engines (the model, its partitions, their process
groups) while the interpreter runs: left to interpreter exit, gloo's threads torn down that late can abort
a run that had succeeded ("terminate called without an active exception")."""

from __future__ import annotations

import gc
from itertools import islice

import torch

from speft_ds.config import EMBEDDED_TASK
from speft_ds.runtime.zero3 import destroy_engine
from tests.distributed.harness import run_ranks
from tests.models import tiny_job


def _alive_after_destroy(rank, world_size, argv):
    from deepspeed.runtime.zero.partitioned_param_coordinator import PartitionedParameterCoordinator

    from speft_ds.cli import parse_config
    from speft_ds.recipe import plan_run, run

    # The run builds two engines (the salience pass's and training's) and generates for the task score,
    # a forward DeepSpeed does not pop from its module stack.
    destroy_engine(run(plan_run(*parse_config(argv))).engine)
    gc.collect()
    alive = gc.get_objects()
    return {"coordinators": sum(isinstance(o, PartitionedParameterCoordinator) for o in alive),
            "partitioned_params": sum(isinstance(o, torch.nn.Parameter) and hasattr(o, "ds_id") for o in alive)}


def test_destroying_the_engines_leaves_no_model_or_partition_alive(tmp_path):
    _, model_dir, dataset = tiny_job(tmp_path, 24)
    task = tmp_path / "task.jsonl"
    with EMBEDDED_TASK.open() as lines:
        task.write_text("".join(islice(lines, 2)))
    argv = ["--model", str(model_dir), "--dataset", str(dataset), "--output_dir", str(tmp_path / "out"),
            "--max_steps", "1", "--micro_batch_size", "2", "--seq_len", "48", "--calibration_examples", "4",
            "--val_size", "0.1", "--density", "0.05", "--eval_task", str(task)]
    for counts in run_ranks(_alive_after_destroy, 2, argv, out_dir=tmp_path / "ranks"):
        assert counts == {"coordinators": 0, "partitioned_params": 0}
