"""Quantized bases (bitsandbytes nf4 and int8) on 2 real ZeRO-3 ranks: salience shards and one training
step against dense single-process references computed on the dequantized weights, a training run, and a
merged model that reproduces the adapter-loaded quantized model."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import deepspeed
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from speft_ds import load_adapter
from speft_ds.config import SHIPPED_DS_CONFIG, TrainConfig
from speft_ds.data.batches import tokenize_dataset
from speft_ds.data.sources import load_raw_dataset
from speft_ds.models.loading import _quantization_config, load_tokenizer
from speft_ds.runtime.distributed import free_port
from speft_ds.runtime.zero3 import destroy_engine
from tests.distributed.harness import run_ranks
from tests.models import write_dataset, write_tiny_llama
from tests.references import (MICRO_BATCH, decoder_linears, dense_gradient, mean_token_loss, plain_micro_batches,
                              plain_split, random_examples, zero3_config)

REPO = Path(__file__).resolve().parents[2]
# nf4 dequantizes exactly and computes in fp32 here; int8 computes in fp16 inside bitsandbytes.
TOLERANCE = {"nf4": 1e-4, "int8": 1e-2}


def _quantized(model_dir: Path, quantize: str):
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, quantization_config=_quantization_config(TrainConfig(model=str(model_dir), quantize=quantize),
                                                            torch.float32), device_map="cpu", dtype=torch.float32)
    return model.train()  # (bitsandbytes' CPU inference path repacks 4-bit weights; dropout is 0 anyway)


def _dequantized_dense_model(model_dir: Path, quantize: str):
    """The plain fp32 model whose linear weights are what the quantized layers compute with: each read
    back through the quantized layer's own forward on the identity."""
    quantized = _quantized(model_dir, quantize)
    dense = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        for name in decoder_linears(dense):
            layer = quantized.get_submodule(name)
            eye = torch.eye(layer.in_features, requires_grad=True)
            dense.get_submodule(name).weight.copy_(layer(eye).detach().float().t())
    return dense


def _salience_shards(rank, world_size, model_dir, quantize, examples):
    from speft_ds.data.batches import rank_batches
    from speft_ds.methods.speft.salience import compute_salience
    from speft_ds.models.loading import find_targets, load_model
    from speft_ds.runtime.ds_config import salience_ds_config

    config = TrainConfig(model=model_dir, quantize=quantize)
    model, hf_ds_config = load_model(config, zero3_config(world_size), torch.float32)
    engine = deepspeed.initialize(model=model, config=salience_ds_config(zero3_config(world_size)))[0]
    targets = find_targets(model, None)
    batches = rank_batches(examples, list(range(len(examples))), rank, world_size, MICRO_BATCH, pad_id=0)
    scores = compute_salience(model, targets, batches, "gradient", show_progress=False)
    result = {name: (s.start, s.scores.clone(), s.numel, s.accumulator_numel) for name, s in scores.items()}
    partitioned = all(m.weight.numel() == 0 for m in targets.values())
    destroy_engine(engine)
    del hf_ds_config
    return {"scores": result, "partitioned": partitioned}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    # bitsandbytes' 4-bit layers need even element counts, so not the odd-sized default test model
    return write_tiny_llama(tmp_path_factory.mktemp("quantized") / "llama", hidden_size=36, intermediate_size=48)


@pytest.mark.parametrize("quantize", ["nf4", "int8"])
def test_salience_shards_of_a_quantized_base_match_the_dequantized_dense_reference(model_dir, tmp_path, quantize):
    dense = _dequantized_dense_model(model_dir, quantize)
    examples = random_examples(dense.config.vocab_size)
    ranks = run_ranks(_salience_shards, 2, str(model_dir), quantize, examples, out_dir=tmp_path)
    reference = {n: g.abs() for n, g in dense_gradient(dense, examples, decoder_linears(dense)).items()}
    for rank, result in enumerate(ranks):
        assert result["partitioned"]  # the packed weights are ZeRO-3 partitions too
        assert list(result["scores"]) == list(reference)
        for name, (start, scores, numel, accumulator) in result["scores"].items():
            ref = reference[name]
            assert numel == ref.numel() and start == rank * accumulator and accumulator >= math.ceil(numel / 2)
            mine = ref[start:start + scores.numel()]
            if quantize == "nf4":
                torch.testing.assert_close(scores, mine, rtol=TOLERANCE["nf4"], atol=1e-6 * ref.abs().max().item())
            else:
                assert (scores - mine).norm() <= TOLERANCE["int8"] * mine.norm()
    for name, ref in reference.items():  # the two shards cover each weight exactly
        assert sum(r["scores"][name][1].numel() for r in ranks) == ref.numel()


@pytest.mark.parametrize("quantize", ["nf4", "int8"])
def test_training_on_a_quantized_base_gives_an_adapter_the_merge_reproduces(model_dir, tmp_path, quantize):
    dataset = tmp_path / "data.jsonl"
    write_dataset(dataset, 48)
    out = tmp_path / "out"
    proc = subprocess.run(["deepspeed", "--num_gpus", "2", "--master_port", str(free_port()), "launch/train.py",
                           "--model", str(model_dir), "--dataset", str(dataset), "--output_dir", str(out),
                           "--quantize", quantize, "--max_steps", "6", "--micro_batch_size", "2", "--seq_len", "48",
                           "--calibration_examples", "8", "--val_size", "0.1", "--density", "0.05",
                           "--learning_rate", "3e-2"],
                          cwd=REPO, capture_output=True, text=True, env={**os.environ, "DS_ACCELERATOR": "cpu"},
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]

    # The quantized base as a checkpoint (quantization is deterministic: the codes training saw).
    quantized_dir = tmp_path / "quantized-base"
    _quantized(model_dir, quantize).save_pretrained(quantized_dir)
    shutil.copy(model_dir / "tokenizer.json", quantized_dir / "tokenizer.json")
    merged_dir = tmp_path / "merged"
    merge = subprocess.run([sys.executable, "launch/merge.py", "--model", str(quantized_dir), "--adapter",
                            str(out / "adapter"), "--out", str(merged_dir), "--dtype", "float32"],
                           cwd=REPO, capture_output=True, text=True, timeout=600)
    assert merge.returncode == 0, merge.stderr[-3000:]

    ids = torch.randint(3, 200, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base_logits = _quantized(model_dir, quantize)(ids).logits
        loaded_logits = load_adapter(_quantized(model_dir, quantize), out / "adapter")(ids).logits
        merged_logits = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32)(ids).logits
    error = (merged_logits - loaded_logits).norm() / loaded_logits.norm()
    moved = (loaded_logits - base_logits).norm() / base_logits.norm()
    print(f"{quantize}: merged vs adapter-loaded logits {error:.2e}, adapter-loaded vs base {moved:.2e}")
    assert error <= TOLERANCE[quantize], f"merged vs adapter-loaded: {error:.2e}"
    assert moved > 10 * max(error, 1e-5), f"the adapter barely changes the model ({moved:.2e})"


def _one_sgd_step_reference(dense, config: TrainConfig, indices: dict[str, torch.Tensor], lr: float, max_norm: float):
    """One plain SGD step of dense deltas, their gradient masked to `indices`, on the first global micro-batch
    (2 ranks x MICRO_BATCH examples, each rank's mean token loss averaged), clipped as the run clips."""
    train_set = plain_split(tokenize_dataset(load_raw_dataset(config), load_tokenizer(config), config),
                            config.val_size, config.seed)
    dense.requires_grad_(False)
    weights = {n: dense.get_submodule(n).weight for n in indices}
    deltas = {n: torch.zeros_like(w, requires_grad=True) for n, w in weights.items()}
    for rank_examples in plain_micro_batches(len(train_set), config.seed, 2, MICRO_BATCH)[0]:
        loss = mean_token_loss(dense, {n: weights[n] + deltas[n] for n in deltas}, [train_set[i] for i in rank_examples])
        (loss / 2).backward()
    grads = [deltas[n].grad.flatten()[indices[n]] for n in indices]
    scale = min(1.0, max_norm / (torch.cat(grads).norm().item() + 1e-6))
    return {n: -lr * scale * g for n, g in zip(indices, grads)}


@pytest.mark.parametrize("quantize", ["nf4", "int8"])
def test_one_training_step_on_a_quantized_base_matches_the_dequantized_dense_reference(model_dir, tmp_path, quantize):
    """Plain SGD (any torch.optim optimizer runs under ZeRO-3), so the trained values are the clipped
    gradients themselves rather than Adam's first step, which is lr x sign(gradient) whatever its size."""
    lr, max_norm = 1.0, 0.05
    dataset = write_dataset(tmp_path / "data.jsonl", 48)
    ds_config = json.loads(SHIPPED_DS_CONFIG.read_text())
    ds_config.update(optimizer={"type": "SGD", "params": {"lr": "auto"}}, zero_allow_untested_optimizer=True)
    (tmp_path / "sgd.json").write_text(json.dumps(ds_config))
    out = tmp_path / "out"
    proc = subprocess.run(["deepspeed", "--num_gpus", "2", "--master_port", str(free_port()), "launch/train.py",
                           "--model", str(model_dir), "--dataset", str(dataset), "--output_dir", str(out),
                           "--ds_config", str(tmp_path / "sgd.json"), "--quantize", quantize, "--max_steps", "1",
                           "--micro_batch_size", str(MICRO_BATCH), "--seq_len", "48", "--calibration_examples", "8",
                           "--val_size", "0.1", "--density", "0.05", "--learning_rate", str(lr),
                           "--lr_scheduler", "constant", "--max_grad_norm", str(max_norm)],
                          cwd=REPO, capture_output=True, text=True, env={**os.environ, "DS_ACCELERATOR": "cpu"},
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    tensors = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    names = list(json.loads((out / "adapter" / "adapter_config.json").read_text())["shapes"])
    indices = {n: tensors[f"{n}.indices"].long() for n in names}
    config = TrainConfig(model=str(model_dir), dataset=str(dataset), seq_len=48, val_size=0.1)
    reference = _one_sgd_step_reference(_dequantized_dense_model(model_dir, quantize), config, indices, lr, max_norm)
    got = torch.cat([tensors[f"{n}.values"].float() for n in names])
    want = torch.cat([reference[n] for n in names])
    error = ((got - want).norm() / want.norm()).item()
    print(f"{quantize}: one step's values vs the dequantized dense reference: relative error {error:.2e}")
    assert bool((want != 0).all()) and error <= TOLERANCE[quantize]
