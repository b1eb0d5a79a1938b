"""Short real training runs on one GPU: launch/train.py as one process (world size 1, no launcher) under
the shipped ZeRO-3 config with bf16 on (`--bf16 true` fills its bf16.enabled), for SPEFT with each delta
implementation and for LoRA; then flash-attention 2 and an nf4 base where those packages import. Each run
must lower the loss and write an adapter whose trained tensors are finite and not zero."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.models import write_dataset, write_tiny_llama

pytestmark = pytest.mark.gpu

REPO = Path(__file__).resolve().parents[2]
STEPS = 24


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpu-training")
    # Even element counts, which bitsandbytes' 4-bit layers need; the same model for every run.
    return write_tiny_llama(root / "llama", hidden_size=36, intermediate_size=48), write_dataset(root / "data.jsonl", 64)


def train(job, out: Path, *flags: str) -> list[dict]:
    """One run on the GPU; returns its metrics.jsonl records after checking what every run must show."""
    model_dir, dataset = job
    proc = subprocess.run(
        [sys.executable, "launch/train.py", "--model", str(model_dir), "--dataset", str(dataset),
         "--output_dir", str(out), "--bf16", "true", "--max_steps", str(STEPS), "--micro_batch_size", "4",
         "--seq_len", "64", "--val_size", "0.1", "--learning_rate", "5e-2", "--logging_steps", "1",
         *([] if "--peft" in flags else ["--calibration_examples", "8", "--density", "0.1"]), *flags],
        cwd=REPO, capture_output=True, text=True, timeout=300,
        env={**os.environ, "DS_ACCELERATOR": "cuda"})  # tests/conftest.py sets cpu for the CPU suite
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    # The model is not on the GPU before it loads ("start"); every later phase holds it there.
    peaks = {r["phase"]: r["device_peak_mib_per_rank"][0] for r in records if r.get("event") == "memory"}
    assert "load" in peaks and all(peaks[phase] > 0 for phase in peaks if phase != "start"), peaks

    losses = [r["loss"] for r in records if "event" not in r]
    assert len(losses) == STEPS and all(map(math.isfinite, losses))
    # The tiny random model starts near ln(vocabulary) and levels off about 2.5% lower (measured on CPU).
    late = sum(losses[-STEPS // 3:]) / (STEPS // 3)
    assert late <= 0.99 * losses[0], f"loss did not fall: {losses}"

    # SPEFT's values and LoRA's B factors start at zero: training must have moved every one of them.
    tensors = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    trained = {k: v for k, v in tensors.items() if k.endswith((".values", "lora_B.weight"))}
    assert trained, sorted(tensors)
    for name, value in trained.items():
        assert value.isfinite().all() and value.abs().max() > 0, name
    return records


@pytest.mark.parametrize("flags", [("--delta_impl", "dense"), ("--delta_impl", "sparse"), ("--peft", "lora")],
                         ids=["speft-dense", "speft-sparse", "lora"])
def test_bf16_training_on_one_gpu(job, tmp_path, flags):
    train(job, tmp_path / "out", *flags)


def test_flash_attention_2_training(job, tmp_path):
    pytest.importorskip("flash_attn", reason="flash-attn is not installed (bench/gpu/gpu_wheels.py leaves it out)")
    train(job, tmp_path / "out", "--attn", "flash_attention_2")


def test_training_on_an_nf4_base(job, tmp_path):
    pytest.importorskip("bitsandbytes")
    train(job, tmp_path / "out", "--quantize", "nf4")
