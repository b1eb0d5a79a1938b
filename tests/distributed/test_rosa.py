"""--peft rosa on 2 real ZeRO-3 ranks (and 1): the sparse mask chosen at the switch is each weight's top of the
task gradient over the calibration examples, with the LoRA factors of that step in place, against a dense
single-process reference; from the switch on, LoRA and the sparse deltas train together as a single-process
AdamW does (the factors keep their moments, the deltas start from zero); the adapter applies alike merged,
unmerged and through the merge command, and reproduces the trained model."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from speft_ds import load_adapter, merge_adapter
from speft_ds.config import SHIPPED_DS_CONFIG, TrainConfig
from speft_ds.data.batches import tokenize_dataset
from speft_ds.data.sources import load_raw_dataset
from speft_ds.models.loading import load_tokenizer
from tests.distributed.harness import run_ranks
from tests.models import tiny_job
from tests.references import decoder_linears, mean_token_loss, plain_micro_batches, plain_permutation, plain_split

REPO = Path(__file__).resolve().parents[2]
STEPS, SWITCH, RANK, ALPHA, K, CALIBRATION, LR, MICRO = 5, 1, 2, 4.0, 700, 8, 1e-2, 2


def _worker(rank, world_size, argv, probe_ids):
    from speft_ds.cli import parse_config
    from speft_ds.recipe import plan_run, run
    from speft_ds.runtime import zero3

    config, explicit = parse_config(argv)
    result = run(plan_run(config, explicit))
    engine = result.engine
    engine.eval()
    with torch.no_grad():
        logits = engine(input_ids=probe_ids).logits
    zero3.destroy_engine(engine)
    return {"logits": logits}


@pytest.fixture(scope="module", params=[2, 1], ids=["2 ranks", "1 rank"])
def trained(request, tmp_path_factory):
    root, model_dir, dataset = tiny_job(tmp_path_factory.mktemp(f"rosa-{request.param}"), 48)
    ds_config = json.loads(SHIPPED_DS_CONFIG.read_text())
    ds_config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    (root / "z3.json").write_text(json.dumps(ds_config))
    out = root / "out"
    argv = ["--peft", "rosa", "--model", str(model_dir), "--dataset", str(dataset), "--ds_config", str(root / "z3.json"),
            "--output_dir", str(out), "--max_steps", str(STEPS), "--rosa_start", str(SWITCH / STEPS),
            "--lora_r", str(RANK), "--lora_alpha", str(ALPHA), "--num_trainable", str(K), "--calibration_examples",
            str(CALIBRATION), "--micro_batch_size", str(MICRO), "--gradient_accumulation_steps", str(2 // request.param),
            "--learning_rate", str(LR), "--lr_scheduler", "constant", "--max_grad_norm", "0", "--seq_len", "48",
            "--val_size", "0.1", "--save_steps", str(SWITCH), "--eval_task", "none", "--logging_steps", "1"]
    probe_ids = torch.tensor([[1, 20, 31, 42, 53, 64, 75, 86]])
    results = run_ranks(_worker, request.param, argv, probe_ids, out_dir=root / "ranks")
    config = TrainConfig(model=str(model_dir), dataset=str(dataset), seq_len=48, val_size=0.1)
    return {"root": root, "out": out, "config": config, "results": results, "probe_ids": probe_ids}


def _checkpoint(out: Path, step: int) -> dict[str, torch.Tensor]:
    """Every key of a checkpoint's rank files, each whole (the ranks' slices joined in order)."""
    directory = out / "checkpoints" / f"step-{step}"
    pieces: dict[str, list] = {}
    for path in sorted(directory.glob("rank-*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            for key in handle.keys():
                pieces.setdefault(key, []).append(handle.get_tensor(key))
    return {key: torch.cat(parts) for key, parts in pieces.items() if not key.startswith("rng/")}


def _largest_remainder(total: int, sizes: list[int]) -> list[int]:
    exact = [total * size / sum(sizes) for size in sizes]
    parts = [math.floor(x) for x in exact]
    for i in sorted(range(len(sizes)), key=lambda i: (parts[i] - exact[i], i))[:total - sum(parts)]:
        parts[i] += 1
    return parts


class Reference:
    """The tiny model in one process, every targeted linear's weight W + D + (alpha / r) B A."""

    def __init__(self, config: TrainConfig):
        self.model = AutoModelForCausalLM.from_pretrained(config.model, dtype=torch.float32).requires_grad_(False)
        self.train_set = plain_split(tokenize_dataset(load_raw_dataset(config), load_tokenizer(config), config),
                                     config.val_size, config.seed)
        self.names = decoder_linears(self.model)
        self.weights = {n: self.model.get_submodule(n).weight for n in self.names}
        self.seed = config.seed

    def effective(self, a, b, d) -> dict[str, torch.Tensor]:
        return {n: self.weights[n] + d[n] + (ALPHA / RANK) * (b[n] @ a[n]) for n in self.names}

    def loss(self, weights, examples: list[int]) -> torch.Tensor:
        return mean_token_loss(self.model, weights, [self.train_set[i] for i in examples])

    def salience(self, a, b) -> dict[str, torch.Tensor]:
        """|d(summed token loss / total tokens) / dW| over the calibration examples, each alone."""
        w = {n: self.weights[n].clone().requires_grad_(True) for n in self.names}
        examples = [self.train_set[i] for i in plain_permutation(len(self.train_set), self.seed)[:CALIBRATION]]
        total = sum(sum(1 for t in e["labels"][1:] if t != -100) for e in examples)
        for e in examples:
            weights = {n: w[n] + (ALPHA / RANK) * (b[n] @ a[n]) for n in self.names}
            logits = torch.func.functional_call(self.model, {f"{n}.weight": v for n, v in weights.items()},
                                                (torch.tensor([e["input_ids"]]),)).logits[0]
            (F.cross_entropy(logits[:-1], torch.tensor(e["labels"][1:]), ignore_index=-100, reduction="sum")
             / total).backward()
        return {n: w[n].grad.flatten().abs() for n in self.names}


def _factors(state: dict, names: list[str], key: str) -> tuple[dict, dict]:
    """(A, B) of each module from a checkpoint's whole tensors (`key`: value or a moment)."""
    a = {n: state[f"{n}.lora_A.default.weight/{key}"] for n in names}
    b = {n: state[f"{n}.lora_B.default.weight/{key}"] for n in names}
    return a, b


def test_the_mask_at_the_switch_is_each_weight_s_top_of_the_gradient(trained):
    reference = Reference(trained["config"])
    state = _checkpoint(trained["out"], SWITCH)
    names = reference.names
    a, b = _factors(state, names, "value")
    a = {n: a[n].view(RANK, -1) for n in names}
    b = {n: b[n].view(-1, RANK) for n in names}
    assert any(t.abs().max() > 0 for t in b.values()), "LoRA never trained before the switch"
    scores = reference.salience(a, b)
    quotas = _largest_remainder(K, [scores[n].numel() for n in names])
    for name, quota in zip(names, quotas):
        got = state[f"indices/{name}.base_layer"].long()
        assert got.numel() == quota
        want = torch.sort(-scores[name], stable=True).indices[:quota].sort().values
        near_ties = (scores[name][got] - scores[name][want]).abs().max()
        assert torch.equal(got, want) or near_ties <= 1e-6 * scores[name].max(), name


def test_the_factors_carry_their_adamw_moments_across_the_switch(trained):
    """The first step trains LoRA alone from B = 0, so A keeps its value and B's gradient g is the reference's
    at (A, 0) on the first batch: the switch's checkpoint, written by the engine built at the switch, holds
    AdamW's first moments of that step, (1 - beta1) g and (1 - beta2) g^2 for B and zeros for A."""
    assert SWITCH == 1
    reference = Reference(trained["config"])
    names = reference.names
    state = _checkpoint(trained["out"], SWITCH)
    values, avg, avg_sq = (_factors(state, names, key) for key in ("value", "exp_avg", "exp_avg_sq"))
    shapes = {n: reference.weights[n].shape for n in names}
    a = {n: values[0][n].view(RANK, shapes[n][1]) for n in names}
    b = {n: torch.zeros(shapes[n][0], RANK, requires_grad=True) for n in names}
    d = {n: torch.zeros(shapes[n]) for n in names}
    for rank_examples in plain_micro_batches(len(reference.train_set), reference.seed, 2, MICRO)[0]:
        (reference.loss(reference.effective(a, b, d), rank_examples) / 2).backward()
    for n in names:
        assert not avg[0][n].any() and not avg_sq[0][n].any()
        torch.testing.assert_close(avg[1][n].view(shapes[n][0], RANK), 0.1 * b[n].grad, rtol=1e-4, atol=1e-9)
        torch.testing.assert_close(avg_sq[1][n].view(shapes[n][0], RANK), 0.001 * b[n].grad ** 2, rtol=1e-3,
                                   atol=1e-12)
    assert any(b[n].grad.abs().max() > 0 for n in names)


def test_lora_and_the_sparse_deltas_train_on_as_one_adamw(trained):
    """From the switch's checkpoint (factors, their moments, the mask), a single-process AdamW over the
    factors (their moments kept) and dense deltas masked to the indices (moments zero), all at the
    optimizer's step count, reaches the adapter the run wrote."""
    reference = Reference(trained["config"])
    names = reference.names
    state = _checkpoint(trained["out"], SWITCH)
    values, avg, avg_sq = (_factors(state, names, key) for key in ("value", "exp_avg", "exp_avg_sq"))
    shapes = {n: reference.weights[n].shape for n in names}
    a = {n: values[0][n].view(RANK, shapes[n][1]).clone().requires_grad_(True) for n in names}
    b = {n: values[1][n].view(shapes[n][0], RANK).clone().requires_grad_(True) for n in names}
    d = {n: torch.zeros(shapes[n], requires_grad=True) for n in names}
    masks = {n: torch.zeros(shapes[n].numel()).index_fill_(0, state[f"indices/{n}.base_layer"].long(), 1.0)
             .view(shapes[n]) for n in names}
    optimizer = torch.optim.AdamW([*a.values(), *b.values(), *d.values()], lr=LR, betas=(0.9, 0.999), eps=1e-8,
                                  weight_decay=0.0)
    for n in names:
        for tensor, (moment_a, moment_b) in ((a[n], (avg[0][n], avg_sq[0][n])), (b[n], (avg[1][n], avg_sq[1][n]))):
            optimizer.state[tensor] = {"step": torch.tensor(float(SWITCH)), "exp_avg": moment_a.view_as(tensor).clone(),
                                       "exp_avg_sq": moment_b.view_as(tensor).clone()}
        optimizer.state[d[n]] = {"step": torch.tensor(float(SWITCH)), "exp_avg": torch.zeros_like(d[n]),
                                 "exp_avg_sq": torch.zeros_like(d[n])}
    batches = plain_micro_batches(len(reference.train_set), reference.seed, 2, MICRO)
    for step in range(SWITCH, STEPS):
        for micro in range(step * 1, (step + 1) * 1):  # one micro-batch per rank per step, 2 ranks' worth
            for rank_examples in batches[micro]:
                (reference.loss(reference.effective(a, b, d), rank_examples) / 2).backward()
        for n in names:
            d[n].grad *= masks[n]
        optimizer.step()
        optimizer.zero_grad()
    adapter = trained["out"] / "adapter"
    lora = load_file(str(adapter / "lora" / "adapter_model.safetensors"))
    sparse = load_file(str(adapter / "sparse" / "adapter_model.safetensors"))
    for n in names:
        torch.testing.assert_close(lora[f"base_model.model.{n}.lora_A.weight"], a[n].detach(), rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(lora[f"base_model.model.{n}.lora_B.weight"], b[n].detach(), rtol=1e-4, atol=1e-6)
        indices = sparse[f"{n}.indices"]
        torch.testing.assert_close(sparse[f"{n}.values"], d[n].detach().flatten()[indices], rtol=1e-4, atol=1e-6)
        assert sparse[f"{n}.values"].abs().max() > 0


def test_the_adapter_applies_alike_merged_unmerged_and_by_the_merge_command(trained):
    config, probe = trained["config"], trained["probe_ids"]
    adapter = trained["out"] / "adapter"
    trained_logits = trained["results"][0]["logits"]

    def base():
        return AutoModelForCausalLM.from_pretrained(config.model, dtype=torch.float32).eval()

    merged_dir = trained["root"] / "merged"
    proc = subprocess.run([sys.executable, "launch/merge.py", "--model", config.model, "--adapter", str(adapter),
                           "--out", str(merged_dir)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    with torch.no_grad():
        for model in (load_adapter(base(), adapter), merge_adapter(base(), adapter),
                      AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()):
            torch.testing.assert_close(model(probe).logits, trained_logits, rtol=1e-5, atol=1e-5)
        assert (base()(probe).logits - trained_logits).abs().max() > 1e-3
    records = [json.loads(line) for line in (trained["out"] / "metrics.jsonl").read_text().splitlines()]
    switch = next(r for r in records if r.get("event") == "rosa_switch")
    assert switch["step"] == SWITCH and switch["k"] == K
    trainable = [r for r in records if r.get("event") == "trainable"]
    assert trainable[-1]["sparse_k"] == K and trainable[-1]["trainable"] == trainable[0]["trainable"] + K
