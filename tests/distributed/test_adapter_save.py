"""The SPEFT adapter saved on 2 real ZeRO-3 ranks, one module at a time: no rank ever holds more gathered
indices and values than one module's, and the file is byte for byte what safetensors' own save_file writes
for every module's gathered tensors at once."""

from __future__ import annotations

import weakref

import torch
from safetensors.torch import save_file

from tests.distributed.harness import run_ranks
from tests.models import tiny_job


def _worker(rank, world_size, argv):
    from speft_ds.cli import parse_config
    from speft_ds.recipe import plan_run, run
    from speft_ds.runtime import zero3

    live, peak = [0], [0]

    def tracked(gather):
        def gather_and_count(param):
            whole = gather(param)
            live[0] += whole.nbytes
            peak[0] = max(peak[0], live[0])
            weakref.finalize(whole, lambda n=whole.nbytes: live.__setitem__(0, live[0] - n))
            return whole
        return gather_and_count

    zero3.gather_full, zero3.gather_full_fp32 = tracked(zero3.gather_full), tracked(zero3.gather_full_fp32)
    config, explicit = parse_config(argv)
    result = run(plan_run(config, explicit))
    peak_during_run = peak[0]  # the save is the run's only gather; the test's own gathers follow
    layers = result.method.layers
    # what one module's gathered index list (int64 at most) and fp32 values take
    largest = max(zero3.full_numel(layer.delta_values) for layer in layers.values()) * (8 + 4)
    whole = {name: (zero3.gather_full(layer.delta_indices).long(), zero3.gather_full_fp32(layer.delta_values))
             for name, layer in layers.items()}
    zero3.destroy_engine(result.engine)
    return {"peak_during_run": peak_during_run, "largest_module": largest,
            "whole": {f"{name}.{part}": t for name, pair in whole.items() for part, t in zip(("indices", "values"), pair)}}


def test_adapter_save_holds_one_module_at_a_time_and_writes_safetensors_bytes(tmp_path):
    root, model_dir, dataset = tiny_job(tmp_path, 48)
    out = root / "out"
    argv = ["--model", str(model_dir), "--dataset", str(dataset), "--output_dir", str(out), "--max_steps", "2",
            "--micro_batch_size", "2", "--seq_len", "48", "--val_size", "0.1", "--density", "0.2",
            "--calibration_examples", "8", "--learning_rate", "3e-2", "--eval_task", "none"]
    ranks = run_ranks(_worker, 2, argv, out_dir=root / "ranks")
    every_module = sum(t.nbytes for t in ranks[0]["whole"].values())
    for result in ranks:
        assert 0 < result["peak_during_run"] <= result["largest_module"] < every_module / 4
    reference = tmp_path / "reference.safetensors"
    save_file({key: t.contiguous() for key, t in ranks[0]["whole"].items()}, str(reference), metadata={"format": "pt"})
    assert (out / "adapter" / "adapter_model.safetensors").read_bytes() == reference.read_bytes()
    assert torch.count_nonzero(ranks[0]["whole"][next(k for k in ranks[0]["whole"] if k.endswith("values"))]) > 0
