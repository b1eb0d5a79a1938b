"""--packing through the salience pass on 2 real ZeRO-3 ranks (gloo): the gradient scores of packed rows
equal a dense single-process reference that runs each packed segment as a sequence of its own."""

from __future__ import annotations

import math

import datasets
import deepspeed
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from speft_ds.data.batches import pack
from speft_ds.runtime.zero3 import destroy_engine
from tests.distributed.harness import run_ranks
from tests.models import write_tiny_llama
from tests.references import MICRO_BATCH, decoder_linears, random_examples, zero3_config

SEQ_LEN = 24


def _worker(rank, world_size, model_dir, rows):
    from speft_ds.config import TrainConfig
    from speft_ds.data.batches import rank_batches
    from speft_ds.methods.speft.salience import compute_salience
    from speft_ds.models.loading import find_targets, load_model

    model, hf_ds_config = load_model(TrainConfig(model=model_dir), zero3_config(world_size), torch.float32)
    engine = deepspeed.initialize(model=model, config=zero3_config(world_size))[0]
    batches = rank_batches(rows, list(range(len(rows))), rank, world_size, MICRO_BATCH, pad_id=0)
    assert all("position_ids" in b and "attention_mask" not in b for b in batches)
    scores = compute_salience(model, find_targets(model, None), batches, "gradient", show_progress=False)
    result = {name: (s.start, s.scores.clone()) for name, s in scores.items()}
    destroy_engine(engine)
    del hf_ds_config
    return result


def segments(row: dict) -> list[dict]:
    """A packed row cut where its position ids restart: each piece is what attention lets a token see."""
    starts = [i for i, p in enumerate(row["position_ids"]) if p == 0 or i == 0] + [len(row["position_ids"])]
    return [{key: row[key][a:b] for key in ("input_ids", "labels", "position_ids")} for a, b in zip(starts, starts[1:])]


def dense_packed_gradient(model, rows: list[dict], names: list[str]) -> dict[str, torch.Tensor]:
    """d loss / dW, loss = summed token loss of every segment run alone / the rows' loss tokens."""
    model.requires_grad_(False)
    weights = [model.get_submodule(n).weight.requires_grad_(True) for n in names]
    total = sum(sum(1 for t in row["labels"][1:] if t != -100) for row in rows)
    loss = 0
    for row in rows:
        for seg in segments(row):
            logits = model(input_ids=torch.tensor([seg["input_ids"]]),
                           position_ids=torch.tensor([seg["position_ids"]])).logits[0]
            labels = torch.tensor(seg["labels"][1:], dtype=torch.long)
            loss = loss + F.cross_entropy(logits[:-1], labels, ignore_index=-100, reduction="sum") / total
    grads = torch.autograd.grad(loss, weights)
    model.requires_grad_(False)
    return {n: g.flatten() for n, g in zip(names, grads)}


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    root = tmp_path_factory.mktemp("packed")
    model_dir = write_tiny_llama(root / "llama", num_layers=2)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    examples = random_examples(model.config.vocab_size, n=20)
    rows = list(pack(datasets.Dataset.from_list(examples), SEQ_LEN))
    return {"model": model, "rows": rows, "ranks": run_ranks(_worker, 2, str(model_dir), rows, out_dir=root / "ranks")}


def test_rows_hold_several_examples_and_cut_ones(packed):
    pieces = [segments(row) for row in packed["rows"]]
    assert all(len(p) >= 2 for p in pieces)
    assert any(p[0]["position_ids"][0] > 0 for p in pieces)  # an example continued from the row before


def test_packed_salience_shards_match_the_segment_by_segment_reference(packed):
    model = packed["model"]
    reference = {n: g.abs() for n, g in dense_packed_gradient(model, packed["rows"], decoder_linears(model)).items()}
    for rank, shards in enumerate(packed["ranks"]):
        assert list(shards) == list(reference)
        for name, (start, scores) in shards.items():
            ref = reference[name]
            assert start == rank * math.ceil(ref.numel() / 2)
            torch.testing.assert_close(scores, ref[start:start + scores.numel()], rtol=1e-5,
                                       atol=1e-5 * ref.abs().max().item(), msg=lambda m: f"{name}: {m}")
