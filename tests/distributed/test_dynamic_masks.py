"""Dynamic masks (reselect, drop_regrow) on 2 real ZeRO-3 ranks against a dense single-process reference."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from speft_ds.config import SHIPPED_DS_CONFIG, TrainConfig
from speft_ds.data.batches import tokenize_dataset
from speft_ds.data.sources import load_raw_dataset
from speft_ds.models.loading import load_tokenizer
from speft_ds.runtime.zero3 import destroy_engine
from tests.distributed.harness import run_ranks
from tests.models import write_dataset, write_tiny_llama
from tests.references import (decoder_linears, dense_gradient, mean_token_loss, plain_micro_batches,
                              plain_permutation, plain_split, reference_top_k)

WORLD, STEPS, EVERY, MICRO_BATCH, LR, MAX_NORM = 2, 4, 2, 2, 1e-2, 1.0
DENSITY, CALIBRATION, REGROW = 0.05, 16, 0.25
SALIENCE_CHUNKS = {"reselect": "2", "drop_regrow": "3"}


def _worker(rank, world_size, argv):
    from speft_ds.cli import parse_config
    from speft_ds.recipe import plan_run, run

    config, explicit = parse_config(argv)
    engine = run(plan_run(config, explicit)).engine
    optimizer = engine.optimizer
    result = {
        "trainable": sum(p.ds_numel for p in engine.module.parameters() if p.requires_grad),
        "fp32_partition_numel": sum(t.numel() for t in optimizer.fp32_partitioned_groups_flat),
        "optimizer_state_numel": [v.numel() for state in optimizer.optimizer.state.values()
                                  for key, v in state.items() if key in ("exp_avg", "exp_avg_sq")],
    }
    destroy_engine(engine)
    return result


@pytest.fixture(scope="module", params=["reselect", "drop_regrow"])
def run_result(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    model_dir = write_tiny_llama(root / "llama")
    dataset = root / "data.jsonl"
    write_dataset(dataset, 48)
    ds_config = json.loads(SHIPPED_DS_CONFIG.read_text())
    (root / "z3.json").write_text(json.dumps(ds_config))
    argv = ["--model", str(model_dir), "--dataset", str(dataset), "--ds_config", str(root / "z3.json"),
            "--output_dir", str(root / "out"), "--max_steps", str(STEPS), "--micro_batch_size", str(MICRO_BATCH),
            "--learning_rate", str(LR), "--lr_scheduler", "constant", "--max_grad_norm", str(MAX_NORM),
            "--calibration_examples", str(CALIBRATION), "--density", str(DENSITY), "--seq_len", "48",
            "--logging_steps", "1", "--val_size", "0.1", "--mask_update_steps", str(EVERY),
            "--mask_update", request.param, "--regrow_fraction", str(REGROW),
            # every salience pass in groups of weights: the masks must still be the dense reference's
            "--salience_chunks", SALIENCE_CHUNKS[request.param]]
    results = run_ranks(_worker, WORLD, argv, out_dir=root / "ranks")
    config = TrainConfig(model=str(model_dir), dataset=str(dataset), seq_len=48, val_size=0.1)
    return {"strategy": request.param, "results": results, "config": config, "out": root / "out"}


class DenseReference:
    """Plain-torch SPEFT: dense deltas D with gradient masks, the same data order, AdamW and mask updates."""

    def __init__(self, config: TrainConfig):
        self.config = config
        self.model = AutoModelForCausalLM.from_pretrained(config.model, dtype=torch.float32).requires_grad_(False)
        self.train_set = plain_split(tokenize_dataset(load_raw_dataset(config), load_tokenizer(config), config),
                                     config.val_size, config.seed)
        self.batches = plain_micro_batches(len(self.train_set), config.seed, WORLD, MICRO_BATCH)
        self.names = decoder_linears(self.model)
        self.weights = {n: self.model.get_submodule(n).weight for n in self.names}
        self.k = max(1, round(DENSITY * sum(w.numel() for w in self.weights.values())))
        self.masks = self.select(self.scores(0), self.k)
        self.deltas = {n: torch.zeros_like(w, requires_grad=True) for n, w in self.weights.items()}
        self.optimizer = self.new_optimizer()

    def new_optimizer(self):
        return torch.optim.AdamW(list(self.deltas.values()), lr=LR, eps=1e-8, weight_decay=0.0)

    def calibration(self, round_: int) -> list[dict]:
        # round r draws the first examples of a permutation seeded with --seed + r
        return [self.train_set[i] for i in plain_permutation(len(self.train_set), self.config.seed + round_)[:CALIBRATION]]

    def scores(self, round_: int, deltas: dict | None = None) -> dict[str, torch.Tensor]:
        """|gradient| at the current effective weights W (+ deltas)."""
        model = self.model
        if deltas:
            model = copy.deepcopy(self.model)
            with torch.no_grad():
                for n, d in deltas.items():
                    model.get_submodule(n).weight += d
        return {n: g.abs() for n, g in dense_gradient(model, self.calibration(round_), self.names).items()}

    def select(self, scores: dict[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
        chosen, _ = reference_top_k([scores[n] for n in self.names], k)
        masks = {}
        for n, picked in zip(self.names, chosen):
            mask = torch.zeros(self.weights[n].numel())
            mask[list(picked)] = 1.0
            masks[n] = mask.view_as(self.weights[n])
        return masks

    def train_step(self, step: int) -> None:
        for rank_examples in self.batches[step - 1]:
            loss = mean_token_loss(self.model, {n: self.weights[n] + self.deltas[n] for n in self.names},
                                   [self.train_set[i] for i in rank_examples])
            (loss / WORLD).backward()
        for n, d in self.deltas.items():
            d.grad *= self.masks[n]
        torch.nn.utils.clip_grad_norm_(list(self.deltas.values()), MAX_NORM)
        self.optimizer.step()
        self.optimizer.zero_grad()

    def fold(self, where: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for n, d in self.deltas.items():
                self.weights[n] += d * where[n]
                d.mul_(1 - where[n])

    def reselect(self, round_: int) -> None:
        self.fold(self.masks)
        self.masks = self.select(self.scores(round_), self.k)
        self.optimizer = self.new_optimizer()

    def drop_regrow(self, round_: int) -> None:
        n_swap = max(1, round(REGROW * self.k))
        magnitudes = {n: (self.deltas[n].detach().abs() * self.masks[n]).flatten() for n in self.names}
        # Among selected entries only: unselected ones get -1, below any |value|.
        ranked = {n: torch.where(self.masks[n].flatten() > 0, m, torch.tensor(-1.0)) for n, m in magnitudes.items()}
        keep = self.select(ranked, self.k - n_swap)
        self.fold({n: self.masks[n] - keep[n] for n in self.names})
        scores = self.scores(round_, {n: self.deltas[n].detach() for n in self.names})
        grow = self.select({n: torch.where(keep[n].flatten() > 0, torch.tensor(float("-inf")), s)
                            for n, s in scores.items()}, n_swap)
        for n, d in self.deltas.items():  # only kept entries keep their moments (dropped and grown: zero)
            state = self.optimizer.state[d]
            state["exp_avg"] *= keep[n]
            state["exp_avg_sq"] *= keep[n]
        self.masks = {n: keep[n] + grow[n] for n in self.names}

    def run(self, strategy: str) -> dict[str, torch.Tensor]:
        for step in range(1, STEPS + 1):
            self.train_step(step)
            if step % EVERY == 0 and step < STEPS:
                getattr(self, strategy)(step // EVERY)
        return {n: self.weights[n] + self.deltas[n].detach() for n in self.names}


def test_trainable_count_is_exactly_k_and_optimizer_state_only_for_live_entries(run_result):
    records = [json.loads(line) for line in (run_result["out"] / "metrics.jsonl").read_text().splitlines()]
    k = next(r["k"] for r in records if r.get("event") == "selection")
    updates = [r for r in records if r.get("event") == "mask_update"]
    assert [u["step"] for u in updates] == list(range(EVERY, STEPS, EVERY))
    assert all(u["k"] == k for u in updates)
    for r in run_result["results"]:
        assert r["trainable"] == k
        assert k / WORLD <= r["fp32_partition_numel"] < k / WORLD + 64
        assert r["optimizer_state_numel"] and all(n == r["fp32_partition_numel"] for n in r["optimizer_state_numel"])
    adapter_config = json.loads((run_result["out"] / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["trainable_k"] == k and adapter_config["k"] >= k


def test_dynamic_masks_match_dense_reference(run_result):
    reference = DenseReference(run_result["config"]).run(run_result["strategy"])
    tensors = load_file(str(run_result["out"] / "adapter" / "adapter_model.safetensors"))
    base = AutoModelForCausalLM.from_pretrained(run_result["config"].model, dtype=torch.float32)
    for name, ref_weight in reference.items():
        weight = base.get_submodule(name).weight.detach().clone()
        if f"{name}.indices" in tensors:
            weight.view(-1)[tensors[f"{name}.indices"]] += tensors[f"{name}.values"]
        torch.testing.assert_close(weight, ref_weight, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
