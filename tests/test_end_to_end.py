"""README's main command on the embedded defaults (with the embedded tiny model instead of SmolLM2,
whose job takes about 13 minutes here): 2 ranks under the DeepSpeed launcher."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from safetensors.torch import load_file

from speft_ds.config import EMBEDDED_MODEL
from speft_ds.runtime.distributed import free_port

REPO = Path(__file__).resolve().parents[1]


def test_default_run_writes_adapter_and_loss_falls(tmp_path):
    out = tmp_path / "speft"
    cmd = ["deepspeed", "--num_gpus", "2", "--master_port", str(free_port()), "launch/train.py",
           "--ds_config", "ds_configs/z3.json", "--output_dir", str(out), "--model", str(EMBEDDED_MODEL)]
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "event" not in r]
    fifth = max(1, len(losses) // 5)
    first, last = sum(losses[:fifth]) / fifth, sum(losses[-fifth:]) / fifth
    assert len(losses) >= 8 and last <= 0.9 * first, (first, last)

    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    tensors = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert config["k"] == sum(tensors[f"{n}.indices"].numel() for n in config["shapes"]) > 0
    assert all(tensors[f"{n}.values"].abs().max() > 0 for n in config["shapes"])
    assert not [p for p in out.iterdir() if p.name.startswith(".")], "temporary files left behind"
