"""Adapters saved on 2 real ZeRO-3 ranks, one module at a time: no rank ever holds more gathered tensors
than one module's (SPEFT's indices and values, LoRA's A and B), and the file is byte for byte what
safetensors' own save_file writes for every module's gathered tensors at once."""

from __future__ import annotations

import weakref

import torch
from safetensors.torch import save_file

from tests.distributed.harness import run_ranks
from tests.models import tiny_job


def _tracked(gather, live: list, peak: list):
    """`gather`, counting the bytes its results hold while they live (`live`) and the most at once (`peak`)."""
    def gather_and_count(param):
        whole = gather(param)
        live[0] += whole.nbytes
        peak[0] = max(peak[0], live[0])
        weakref.finalize(whole, lambda n=whole.nbytes: live.__setitem__(0, live[0] - n))
        return whole
    return gather_and_count


def _worker(rank, world_size, argv):
    from speft_ds.cli import parse_config
    from speft_ds.recipe import plan_run, run
    from speft_ds.runtime import zero3

    live, peak = [0], [0]
    zero3.gather_full = _tracked(zero3.gather_full, live, peak)
    zero3.gather_full_fp32 = _tracked(zero3.gather_full_fp32, live, peak)
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


def _saved_one_module_at_a_time(tmp_path, worker, *flags: str) -> dict[str, torch.Tensor]:
    """Train the tiny job on 2 ranks with `flags`; check that each rank's gathered bytes never exceeded one
    module's and that the adapter's weights file is what save_file writes for every gathered tensor at once;
    returns those tensors."""
    root, model_dir, dataset = tiny_job(tmp_path, 48)
    out = root / "out"
    argv = ["--model", str(model_dir), "--dataset", str(dataset), "--output_dir", str(out), "--max_steps", "2",
            "--micro_batch_size", "2", "--seq_len", "48", "--val_size", "0.1", "--learning_rate", "3e-2",
            "--eval_task", "none", *flags]
    ranks = run_ranks(worker, 2, argv, out_dir=root / "ranks")
    every_module = sum(t.nbytes for t in ranks[0]["whole"].values())
    for result in ranks:
        assert 0 < result["peak_during_run"] <= result["largest_module"] < every_module / 4
    reference = tmp_path / "reference.safetensors"
    save_file({key: t.contiguous() for key, t in ranks[0]["whole"].items()}, str(reference), metadata={"format": "pt"})
    assert (out / "adapter" / "adapter_model.safetensors").read_bytes() == reference.read_bytes()
    return ranks[0]["whole"]


def test_adapter_save_holds_one_module_at_a_time_and_writes_safetensors_bytes(tmp_path):
    whole = _saved_one_module_at_a_time(tmp_path, _worker, "--density", "0.2", "--calibration_examples", "8")
    assert torch.count_nonzero(whole[next(key for key in whole if key.endswith("values"))]) > 0


def _lora_worker(rank, world_size, argv):
    from speft_ds.cli import parse_config
    from speft_ds.methods.lora.adapter import peft_key
    from speft_ds.recipe import plan_run, run
    from speft_ds.runtime import zero3

    live, peak = [0], [0]
    zero3.gather_full_fp32 = _tracked(zero3.gather_full_fp32, live, peak)
    config, explicit = parse_config(argv)
    result = run(plan_run(config, explicit))
    peak_during_run = peak[0]
    factors = result.method.factors
    largest = max((zero3.full_numel(a) + zero3.full_numel(b)) * 4 for a, b in factors.values())
    whole = {peft_key(module, name): zero3.gather_full_fp32(t) for module, pair in factors.items()
             for name, t in zip("AB", pair)}
    zero3.destroy_engine(result.engine)
    return {"peak_during_run": peak_during_run, "largest_module": largest, "whole": whole}


def test_lora_adapter_save_holds_one_module_at_a_time_and_writes_safetensors_bytes(tmp_path):
    whole = _saved_one_module_at_a_time(tmp_path, _lora_worker, "--peft", "lora", "--lora_r", "4")
    assert torch.count_nonzero(next(t for key, t in whole.items() if "lora_B" in key)) > 0
