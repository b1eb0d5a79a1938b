"""--gradient_checkpointing and --attn change how activations are computed and kept, not what is learned:
2-rank ZeRO-3 runs with them end with the adapter of a run without them."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from speft_ds.runtime.distributed import free_port
from tests.models import tiny_job

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return tiny_job(tmp_path_factory.mktemp("memory-options"), 40)


def _adapter(inputs, name: str, *extra: str) -> dict[str, torch.Tensor]:
    root, model_dir, dataset = inputs
    out = root / name
    proc = subprocess.run(["deepspeed", "--num_gpus", "2", "--master_port", str(free_port()), "launch/train.py",
                           "--model", str(model_dir), "--dataset", str(dataset), "--output_dir", str(out),
                           "--max_steps", "4", "--micro_batch_size", "2", "--seq_len", "48",
                           "--calibration_examples", "8", "--val_size", "0.1", "--density", "0.05",
                           "--learning_rate", "1e-2", *extra],
                          cwd=REPO, capture_output=True, text=True, env={**os.environ, "DS_ACCELERATOR": "cpu"},
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def plain(inputs) -> dict[str, torch.Tensor]:
    return _adapter(inputs, "plain")


@pytest.mark.parametrize("options", [("--gradient_checkpointing",), ("--attn", "eager")], ids=lambda o: o[-1])
def test_memory_options_learn_the_same_adapter(inputs, plain, options):
    other = _adapter(inputs, "-".join(options).strip("-"), *options)
    assert plain.keys() == other.keys()
    for key in plain:
        if key.endswith(".indices"):
            assert torch.equal(plain[key], other[key]), key  # the same mask
        else:
            assert plain[key].abs().max() > 0
            torch.testing.assert_close(other[key], plain[key], rtol=1e-4, atol=1e-6, msg=key)
