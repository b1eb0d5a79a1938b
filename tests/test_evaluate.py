"""Task evaluation (speft_ds.data.task_eval, launch/evaluate.py): scoring rules, plain-torch references for
generation and multiple choice, 1 rank against 2 ZeRO-3 ranks, base + adapter against the merged model,
and task scores recorded by a training run."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from speft_ds.config import ConfigError
from speft_ds.data.task_eval import is_correct, load_task, mean_and_stderr
from speft_ds.runtime.distributed import free_port
from tests.models import tiny_job

REPO = Path(__file__).resolve().parents[1]
MAX_NEW = 12


@pytest.mark.parametrize("output, answer, correct", [
    (" 10 * 9 = 90. The bags hold 90 apples.", "90", True),   # the last number counts
    (" 10 * 9 = 90. The bags hold 91 apples.", "90", False),
    ("It is 1,234.", "1234", True),
    ("-3 left", "-3", True),
    ("no number", "7", False),
    ("  Paris! ", "paris", True),                               # text: case, punctuation, spaces
    ("Paris, France", "Paris", False),
])
def test_answers_are_judged_numerically_or_as_normalised_text(output, answer, correct):
    assert is_correct(output, answer) is correct


def test_stderr_is_the_sample_standard_deviation_over_root_n():
    mean, stderr = mean_and_stderr([1.0, 0.0, 1.0, 1.0])
    assert mean == 0.75 and stderr == pytest.approx(math.sqrt(0.75 * 0.25 * 4 / 3 / 4))
    assert math.isnan(mean_and_stderr([1.0])[1])


def test_bad_task_files_are_one_clear_error(tmp_path):
    (tmp_path / "fields.jsonl").write_text('{"question": "1 + 1?"}\n')
    (tmp_path / "label.jsonl").write_text('{"prompt": "?", "choices": ["a", "b"], "label": 2}\n')
    (tmp_path / "broken.jsonl").write_text('{"prompt": \n')
    for name, expected in (("fields", "prompt + answer"), ("label", "label outside"),
                           ("broken", "broken.jsonl, line 1: not JSON")):
        with pytest.raises(ConfigError, match=re.escape(expected)):
            load_task(tmp_path / f"{name}.jsonl")


def _write_tasks(root: Path) -> tuple[Path, Path]:
    generation, choice = root / "gen.jsonl", root / "mc.jsonl"
    prompts = [f"Question: Tom has {a} pens and gets {b} more. How many pens does Tom have now?\nAnswer:"
               for a, b in ((3, 4), (12, 7), (25, 30), (8, 8), (40, 2))]
    generation.write_text("".join(json.dumps({"prompt": p, "answer": "7", "stop": ["\n"]}) + "\n" for p in prompts))
    choice.write_text("".join(json.dumps({"prompt": p, "choices": ["7", "19", "a lot of pens", "55"], "label": i % 4})
                              + "\n" for i, p in enumerate(prompts)))
    return generation, choice


def _reference_generation(model, tokenizer, prompt: str) -> str:
    """Greedy decoding without a cache: the argmax of a full forward, one token at a time."""
    ids = [tokenizer.bos_token_id] + tokenizer.encode(prompt, add_special_tokens=False)
    new = []
    for _ in range(MAX_NEW):
        logits = model(torch.tensor([ids + new])).logits[0, -1]
        token = int(logits.argmax())
        if token == tokenizer.eos_token_id:
            break
        new.append(token)
        if "\n" in tokenizer.decode(new):
            break
    return tokenizer.decode(new, skip_special_tokens=True).split("\n")[0]


def _reference_loglikelihood(model, tokenizer, prompt: str, choice: str) -> float:
    """One unpadded sequence per choice: sum of log p(continuation token | everything before it)."""
    context = [tokenizer.bos_token_id] + tokenizer.encode(prompt, add_special_tokens=False)
    whole = [tokenizer.bos_token_id] + tokenizer.encode(f"{prompt} {choice}", add_special_tokens=False)
    logprobs = F.log_softmax(model(torch.tensor([whole])).logits[0].double(), dim=-1)
    return sum(logprobs[i - 1, whole[i]].item() for i in range(len(context), len(whole)))


@pytest.fixture(scope="module", params=["speft", "roselora"])
def trained(request, tmp_path_factory):
    """A tiny model with a trained adapter (2 ranks; SPEFT's format, or LoRA's in PEFT's), its merged
    directory, and two small tasks."""
    root, model_dir, dataset = tiny_job(tmp_path_factory.mktemp(f"evaluate-{request.param}"), 48)
    out = root / "out"
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    train = subprocess.run(["deepspeed", "--num_gpus", "2", "--master_port", str(free_port()), "launch/train.py",
                            "--model", str(model_dir), "--dataset", str(dataset), "--output_dir", str(out),
                            "--max_steps", "4", "--micro_batch_size", "2", "--seq_len", "48", "--val_size", "0.1",
                            "--learning_rate", "3e-2", "--peft", request.param,
                            *(["--density", "0.05", "--calibration_examples", "8"] if request.param == "speft"
                              else ["--lora_r", "4"])],
                           cwd=REPO, capture_output=True, text=True, env=env, timeout=600)
    assert train.returncode == 0, train.stderr[-3000:]
    merged = root / "merged"
    merge = subprocess.run([sys.executable, "launch/merge.py", "--model", str(model_dir), "--adapter",
                            str(out / "adapter"), "--out", str(merged), "--dtype", "float32"],
                           cwd=REPO, capture_output=True, text=True, timeout=600)
    assert merge.returncode == 0, merge.stderr[-3000:]
    generation, choice = _write_tasks(root)
    return {"root": root, "model": model_dir, "adapter": out / "adapter", "merged": merged,
            "tasks": {"generation": generation, "multiple_choice": choice}}


def _evaluate(trained, task: str, ranks: int, model: str = "model", adapter: bool = True) -> dict:
    output = trained["root"] / f"{task}-{ranks}-{model}-{adapter}.json"
    args = ["--model", str(trained[model]), "--task", str(trained["tasks"][task]), "--output", str(output),
            "--overwrite", "--max_new_tokens", str(MAX_NEW), *(["--adapter", str(trained["adapter"])] if adapter else [])]
    launcher = ([sys.executable] if ranks == 1 else
                ["deepspeed", "--num_gpus", str(ranks), "--master_port", str(free_port())])
    proc = subprocess.run([*launcher, "launch/evaluate.py", *args], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "DS_ACCELERATOR": "cpu"}, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "accuracy" in proc.stdout
    return json.loads(output.read_text())


@pytest.mark.parametrize("task", ["generation", "multiple_choice"])
def test_one_rank_matches_plain_torch_references(trained, task):
    from speft_ds import load_adapter

    tokenizer = AutoTokenizer.from_pretrained(trained["model"])
    model = load_adapter(AutoModelForCausalLM.from_pretrained(trained["model"], dtype=torch.float32),
                         trained["adapter"]).eval()
    result = _evaluate(trained, task, 1)
    examples = load_task(trained["tasks"][task]).examples
    with torch.no_grad():
        for example, prediction in zip(examples, result["predictions"], strict=True):
            if task == "generation":
                assert prediction["output"] == _reference_generation(model, tokenizer, example["prompt"])
            else:
                want = [_reference_loglikelihood(model, tokenizer, example["prompt"], c) for c in example["choices"]]
                assert prediction["loglikelihoods"] == pytest.approx(want, rel=1e-5, abs=1e-5)
                assert prediction["choice"] == max(range(4), key=lambda i: want[i])
                assert prediction["choice_norm"] == max(range(4), key=lambda i: want[i] / len(example["choices"][i]))
    assert result["accuracy"] == sum(p["correct"] for p in result["predictions"]) / len(examples)


@pytest.mark.parametrize("task", ["generation", "multiple_choice"])
def test_two_zero3_ranks_and_the_merged_model_give_the_single_process_result(trained, task):
    one = _evaluate(trained, task, 1)
    for other in (_evaluate(trained, task, 2), _evaluate(trained, task, 1, model="merged", adapter=False)):
        assert other["accuracy"] == one["accuracy"] and other["stderr"] == one["stderr"]
        for a, b in zip(one["predictions"], other["predictions"], strict=True):
            if task == "generation":
                assert a["output"] == b["output"]
            else:
                assert (a["choice"], a["choice_norm"]) == (b["choice"], b["choice_norm"])
                assert a["loglikelihoods"] == pytest.approx(b["loglikelihoods"], rel=1e-6, abs=1e-6)
    if task == "multiple_choice":  # the adapter is really applied: the base alone scores the choices otherwise
        base = _evaluate(trained, task, 1, adapter=False)
        assert all(p["loglikelihoods"] != q["loglikelihoods"] for p, q in zip(base["predictions"], one["predictions"]))


@pytest.mark.parametrize("eval_on_start", [True, False])
def test_training_scores_the_task_before_during_and_after(tmp_path, eval_on_start):
    root, model_dir, dataset = tiny_job(tmp_path, 48)
    generation, _ = _write_tasks(root)
    out = root / "out"
    proc = subprocess.run(["deepspeed", "--num_gpus", "2", "--master_port", str(free_port()), "launch/train.py",
                           "--model", str(model_dir), "--dataset", str(dataset), "--output_dir", str(out),
                           "--max_steps", "4", "--eval_steps", "2", "--micro_batch_size", "2", "--seq_len", "48",
                           "--calibration_examples", "8", "--val_size", "0.1", "--eval_task", str(generation),
                           "--eval_on_start", str(eval_on_start)],
                          cwd=REPO, capture_output=True, text=True, env={**os.environ, "DS_ACCELERATOR": "cpu"},
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    scores = [r for r in records if r.get("event") == "task_eval"]
    assert [(r["when"], r["step"]) for r in scores] == [("before", 0)] * eval_on_start + [("during", 2), ("after", 4)]
    assert all(set(r) == {"event", "task", "step", "when", "accuracy", "stderr", "examples"} for r in scores)
    assert all(r["examples"] == 5 and 0 <= r["accuracy"] <= 1 for r in scores)
    assert [r["step"] for r in records if r.get("event") == "eval"] == [2, 4]
    others = [key for r in records if r.get("event") != "task_eval" for key in r if "acc" in key]
    assert not others, f"only task_eval records may carry accuracy-like keys: {others}"
    summary = [line for line in proc.stdout.splitlines() if line.startswith("task gen (5 held-out examples)")]
    assert len(summary) == 1 and summary[0].count("->") == len(scores) - 1, proc.stdout[-2000:]
