"""Checkpoints saved on 2 real ZeRO-3 ranks: no rank gathers anything while saving, the largest tensor a rank
writes is its slice of one module, and the ranks' slices put together are the whole trained state, checked
against the adapter (whose values and indices are gathered by another path) and the optimizer's own
partitions."""

from __future__ import annotations

import json

import torch
from safetensors import safe_open

from tests.distributed.harness import run_ranks
from tests.models import tiny_job


def _worker(rank, world_size, argv):
    from speft_ds.cli import parse_config
    from speft_ds.recipe import plan_run, run
    from speft_ds.runtime import checkpoint, zero3

    saving, gathers_while_saving, largest_written = [False], [0], [0]

    def counted(gather):
        def gather_and_count(*args, **kwargs):
            gathers_while_saving[0] += saving[0]
            return gather(*args, **kwargs)
        return gather_and_count

    for name in ("gather_full", "gather_full_fp32", "adam_moments", "gather_from_shards"):
        setattr(zero3, name, counted(getattr(zero3, name)))

    class MeasuredWriter(checkpoint.SafetensorsWriter):
        def add(self, key, tensor):
            if not key.startswith("rng/"):
                largest_written[0] = max(largest_written[0], tensor.nbytes)
            super().add(key, tensor)

    def save_watched(*args, **kwargs):
        saving[0] = True
        try:
            return save(*args, **kwargs)
        finally:
            saving[0] = False

    save = checkpoint.save
    checkpoint.save, checkpoint.SafetensorsWriter = save_watched, MeasuredWriter
    config, explicit = parse_config(argv)
    result = run(plan_run(config, explicit))
    layers = result.method.layers
    # one module's slice on this rank: its values (fp32) or its indices, whichever is larger
    largest_slice = max(zero3.shard_numel(layer.delta_values) * max(layer.delta_indices.element_size(), 4)
                        for layer in layers.values())
    moments = {name: {key: t.clone() for key, t in zero3.local_trained_state(layer.delta_values, moments=True).items()}
               for name, layer in layers.items()}
    zero3.destroy_engine(result.engine)
    return {"gathers_while_saving": gathers_while_saving[0], "largest_written": largest_written[0],
            "largest_slice": largest_slice, "layer_order": list(layers),
            "moments": {f"{name}.delta_values/{key}": t for name, state in moments.items() for key, t in state.items()}}


def test_each_rank_saves_its_own_slices_and_together_they_are_the_whole_state(tmp_path):
    root, model_dir, dataset = tiny_job(tmp_path, 48)
    out = root / "out"
    argv = ["--model", str(model_dir), "--dataset", str(dataset), "--output_dir", str(out), "--max_steps", "2",
            "--save_steps", "1", "--micro_batch_size", "2", "--seq_len", "48", "--val_size", "0.1",
            "--density", "0.2", "--calibration_examples", "8", "--learning_rate", "3e-2", "--eval_task", "none"]
    ranks = run_ranks(_worker, 2, argv, out_dir=root / "ranks")
    for result in ranks:
        assert result["gathers_while_saving"] == 0
        assert 0 < result["largest_written"] <= result["largest_slice"]

    step = out / "checkpoints" / "step-2"
    assert sorted(p.name for p in step.iterdir()) == ["manifest.json", "rank-00000-of-00002.safetensors",
                                                      "rank-00001-of-00002.safetensors", "speft_state.safetensors"]
    with safe_open(str(step / "speft_state.safetensors"), framework="pt") as handle:
        assert not any(key.startswith("indices/") for key in handle.keys())  # nothing whole on rank 0
    pieces: dict[str, list] = {}
    for rank in range(2):
        with safe_open(str(step / f"rank-{rank:05d}-of-00002.safetensors"), framework="pt") as handle:
            for key, (start, stop) in json.loads(handle.metadata()["ranges"]).items():
                tensor = handle.get_tensor(key)
                assert tensor.numel() == stop - start
                pieces.setdefault(key, []).append((start, stop, tensor))
                if key in ranks[rank]["moments"]:  # this rank's slice of the optimizer's partitions, as it left them
                    assert torch.equal(tensor, ranks[rank]["moments"][key])
    whole = {}
    for key, parts in pieces.items():
        if key.startswith("rng/"):
            continue
        parts.sort(key=lambda part: part[0])
        assert parts[0][0] == 0 and all(a[1] == b[0] for a, b in zip(parts, parts[1:]))  # they tile the tensor
        whole[key] = torch.cat([tensor for _, _, tensor in parts])

    with safe_open(str(out / "adapter" / "adapter_model.safetensors"), framework="pt") as adapter:
        names = ranks[0]["layer_order"]
        assert sorted(names) == sorted(key.removesuffix(".values") for key in adapter.keys() if key.endswith(".values"))
        for name in names:
            assert torch.equal(whole[f"indices/{name}"].long(), adapter.get_tensor(f"{name}.indices"))
            values = whole[f"{name}.delta_values/value"]
            assert torch.equal(values, adapter.get_tensor(f"{name}.values")) and torch.count_nonzero(values) > 0
