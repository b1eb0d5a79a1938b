"""--retention_text on 1 and 2 real ZeRO-3 ranks (gloo), SPEFT and LoRA: the loss and KL(base || tuned) the
run records before and after training against a plain single-process reference (the base model, and the
base with the saved adapter applied: SPEFT's deltas added into dense weights by hand, LoRA's through the
real `peft` loader), on rows cut by hand from a .jsonl text."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from speft_ds.methods.speft.adapter_format import read_adapter
from tests.distributed.harness import run_ranks
from tests.models import tiny_job

SEQ_LEN = 48
DOCUMENTS = ["Tom has 12 apples and Anna has 30 books. " * 6, "Mei gave 4 coins to Sam.", "The bags hold 90 eggs. " * 9]


def _worker(rank, world_size, argv):
    from speft_ds.cli import parse_config
    from speft_ds.recipe import plan_run, run
    from speft_ds.runtime import zero3

    config, explicit = parse_config(argv)
    result = run(plan_run(config, explicit))
    zero3.destroy_engine(result.engine)
    return None


def _run(root, model_dir, dataset, method: str, world_size: int) -> list[dict]:
    text = root / "general.jsonl"
    text.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCUMENTS))
    out = root / f"{method}-{world_size}"
    argv = ["--peft", method, "--model", str(model_dir), "--dataset", str(dataset), "--output_dir", str(out),
            "--max_steps", "4", "--micro_batch_size", "2", "--seq_len", str(SEQ_LEN), "--learning_rate", "3e-2",
            "--val_size", "0.1", "--eval_task", "none", "--retention_text", str(text),
            *(["--density", "0.2", "--calibration_examples", "8"] if method == "speft" else ["--lora_r", "4"])]
    run_ranks(_worker, world_size, argv, out_dir=root / f"ranks-{method}-{world_size}")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if r.get("event") == "retention"], out / "adapter"


def _rows(tokenizer) -> list[list[int]]:
    rows = []
    for document in DOCUMENTS:
        ids = [tokenizer.bos_token_id] + tokenizer(document, add_special_tokens=False)["input_ids"]
        rows += [ids[i:i + SEQ_LEN] for i in range(0, len(ids), SEQ_LEN) if len(ids[i:i + SEQ_LEN]) > 1]
    return rows


def _log_probs(model, rows) -> list[torch.Tensor]:
    """Each row alone (no padding): log-probabilities of the next token at every predicted position."""
    with torch.no_grad():
        return [F.log_softmax(model(input_ids=torch.tensor([row])).logits[0, :-1].double(), dim=-1) for row in rows]


def _reference(base, tuned, rows) -> dict:
    tokens = sum(len(row) - 1 for row in rows)
    base_lp, tuned_lp = _log_probs(base, rows), _log_probs(tuned, rows)
    loss = sum(-lp.gather(1, torch.tensor(row[1:])[:, None]).sum() for lp, row in zip(tuned_lp, rows)) / tokens
    kl = sum(F.kl_div(t, b, log_target=True, reduction="sum") for b, t in zip(base_lp, tuned_lp)) / tokens
    return {"loss": loss.item(), "kl": kl.item(), "tokens": tokens}


def _tuned_speft(model_dir, adapter):
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    indices, values, _ = read_adapter(adapter)
    with torch.no_grad():
        for name, idx in indices.items():
            model.get_submodule(name).weight.view(-1)[idx] += values[name]
    return model


_CASES = [("speft", 1), ("speft", 2), ("lora", 2)]


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    return tiny_job(tmp_path_factory.mktemp("retention"), 48)


@pytest.mark.parametrize("method,world_size", _CASES)
def test_retention_matches_a_single_process_reference(job, method, world_size):
    root, model_dir, dataset = job
    records, adapter = _run(root, model_dir, dataset, method, world_size)
    assert [(r["when"], r["step"]) for r in records] == [("before", 0), ("after", 4)]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rows = _rows(tokenizer)
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    tuned = (_tuned_speft(model_dir, adapter) if method == "speft"
             else PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), adapter))
    before, after = records
    untouched = _reference(base, base, rows)
    assert before["tokens"] == after["tokens"] == untouched["tokens"]
    assert before["loss"] == pytest.approx(untouched["loss"], rel=1e-5)
    assert abs(before["kl"]) < 1e-9  # the untrained update changes nothing
    expected = _reference(base, tuned, rows)
    assert expected["kl"] > 1e-3 and expected["loss"] != pytest.approx(untouched["loss"], rel=1e-3)  # it moved
    assert after["loss"] == pytest.approx(expected["loss"], rel=1e-5)
    assert after["kl"] == pytest.approx(expected["kl"], rel=1e-4, abs=1e-8)
