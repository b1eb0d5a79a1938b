"""Every DeepSpeed config shipped in ds_configs/ parses, and starts a real 2-rank ZeRO-3 run that trains
and writes an adapter (on CPU: offloading to the CPU and bf16 included)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from speft_ds.cli import parse_config
from speft_ds.recipe import plan_run
from speft_ds.runtime.distributed import free_port
from tests.models import write_dataset, write_tiny_llama

REPO = Path(__file__).resolve().parents[1]
SHIPPED = sorted((REPO / "ds_configs").glob("*.json"))


def test_the_shipped_configs_are_the_documented_ones():
    assert [p.name for p in SHIPPED] == ["z3.json", "z3_cluster.json", "z3_offload.json"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ds-configs")
    dataset = root / "data.jsonl"
    write_dataset(dataset, 32)
    return write_tiny_llama(root / "llama"), dataset


@pytest.mark.parametrize("ds_config", SHIPPED, ids=lambda p: p.name)
def test_a_shipped_config_parses_and_starts_a_two_rank_run(inputs, tmp_path, ds_config):
    model_dir, dataset = inputs
    args = ["--model", str(model_dir), "--dataset", str(dataset), "--output_dir", str(tmp_path / "out"),
            "--ds_config", str(ds_config), "--max_steps", "2", "--micro_batch_size", "2", "--seq_len", "48",
            "--calibration_examples", "8", "--val_size", "0.1", "--density", "0.05"]
    plan = plan_run(*parse_config(args))
    assert plan.ds_config["zero_optimization"]["stage"] == 3
    assert "auto" not in json.dumps(plan.ds_config)  # every "auto" filled before any heavy work

    proc = subprocess.run(["deepspeed", "--num_gpus", "2", "--master_port", str(free_port()), "launch/train.py",
                           *args, "--logging_steps", "1"], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "DS_ACCELERATOR": "cpu"}, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    steps = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in steps if "event" not in r] == [1, 2]
    # The run ends with one summary block on rank 0, read from those records; its last line names the adapter.
    block = proc.stdout[proc.stdout.index("---- run summary ----"):].splitlines()[:6]  # the launcher's lines follow
    k = next(r["k"] for r in steps if r.get("event") == "delta")
    final_loss = [r["eval_loss"] for r in steps if r.get("event") == "eval"][-1]
    assert proc.stdout.count("---- run summary ----") == 1, proc.stdout[-2000:]
    assert block[1].startswith(f"method       speft: {k:,} trainable, ")
    assert [part.split()[0] for part in block[2].removeprefix("time").split("|")] == \
        ["load", "salience", "selection", "training", "eval", "save"]
    assert block[3].startswith("peak memory  ") and block[3].count(",") == 1  # two ranks
    assert block[4].startswith(f"eval loss    {final_loss:.4f} ")
    assert block[5] == f"adapter      {tmp_path / 'out' / 'adapter'}"
    tensors = load_file(str(tmp_path / "out" / "adapter" / "adapter_model.safetensors"))
    values = torch.cat([t.float() for key, t in tensors.items() if key.endswith(".values")])
    # Trained: each of the k values took two optimizer steps away from zero (each was chosen for a non-zero
    # calibration gradient), and none overflowed in this config's precision.
    assert values.numel() == k and int(torch.count_nonzero(values)) == k and bool(values.isfinite().all())
