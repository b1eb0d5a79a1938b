"""Task accuracy: one implementation for launch/evaluate.py and for training (--eval_task).

A task is a .jsonl file of one of two kinds, told apart by its fields:
- generation, {"prompt", "answer"} (optionally "stop": a list of stop strings): greedy decoding from the
  prompt until EOS or a stop string (default "\\n\\n", as lm-evaluation-harness). A numeric answer is
  right when the output's last number equals it (lm-evaluation-harness's flexible extraction for GSM8K);
  any other answer when the output equals it after normalisation (case, punctuation, whitespace).
- multiple choice, {"prompt", "choices", "label"}: the log-likelihood of " " + choice after the prompt;
  `acc` takes the likeliest choice, `acc_norm` the likeliest per character of the choice
  (lm-evaluation-harness's definitions).

Prompts are framed as training frames them: BOS, then the prompt's tokens. Generation runs in batches of
consecutive examples (left-padded; per-token decoding under ZeRO-3 gathers every layer, so one batch costs
about what one example does); the batches are fixed by file order, so a result does not depend on how many
ranks share them. Under ZeRO-3 every rank runs the same number of forward passes (generation with synced
ranks, a repeat where a rank runs out). Standard errors are lm-evaluation-harness's: sample standard
deviation over sqrt(n).
"""

from __future__ import annotations

import json
import math
import re
import string
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from ..config import ConfigError
from .batches import prompt_ids

DEFAULT_STOP = ("\n\n",)
DEFAULT_MAX_NEW_TOKENS = 64
GENERATION_BATCH = 32
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
_KINDS = {"generation": ("prompt", "answer"), "multiple_choice": ("prompt", "choices", "label")}


@dataclass(frozen=True)
class Task:
    name: str
    kind: str  # "generation" or "multiple_choice"
    examples: tuple[dict, ...]


def load_task(path: str | Path) -> Task:
    """Read and check a task file (one line per example, every line of the same kind)."""
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"--eval_task {path} is not a readable .jsonl file ({err}): fix or replace it") from None
    examples = []
    for number, line in enumerate(lines, start=1):
        if line.strip():
            try:
                examples.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ConfigError(f"--eval_task {path}, line {number}: not JSON ({err.msg}): fix that line") from None
    examples = tuple(examples)
    kinds = [kind for kind, needed in _KINDS.items() if examples and all(
        isinstance(e, dict) and all(key in e for key in needed) for e in examples)]
    if not kinds:
        raise ConfigError(f"--eval_task {path} needs every line to hold prompt + answer (generation) or prompt + "
                          "choices + label (multiple choice)")
    kind = kinds[-1]  # a line with choices and label is multiple choice even if it also has an answer
    if kind == "multiple_choice" and any(not 0 <= e["label"] < len(e["choices"]) for e in examples):
        raise ConfigError(f"--eval_task {path} has a label outside its choices: labels count from 0")
    return Task(path.stem, kind, examples)


@dataclass
class TaskResult:
    task: str
    kind: str
    examples: int
    accuracy: float                     # exact match (generation) or acc (multiple choice)
    stderr: float
    accuracy_norm: float | None = None  # acc_norm (multiple choice)
    stderr_norm: float | None = None
    ended_with_eos: float | None = None  # share of generations that stopped at EOS (generation)
    predictions: list = field(default_factory=list)  # per example, in file order

    def to_json(self) -> dict:
        return asdict(self)


def mean_and_stderr(scores: list[float]) -> tuple[float, float]:
    n = len(scores)
    mean = sum(scores) / n
    if n < 2:
        return mean, float("nan")
    return mean, math.sqrt(sum((s - mean) ** 2 for s in scores) / (n - 1) / n)


def _normalise(text: str) -> str:
    text = text.lower().translate(str.maketrans("", "", string.punctuation))
    return " ".join(text.split())


def _as_number(text: str) -> float | None:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return None


def is_correct(output: str, answer) -> bool:
    """A numeric answer against the output's last number; anything else as normalised text."""
    expected = _as_number(str(answer).strip())
    if expected is None:
        return _normalise(output) == _normalise(str(answer))
    numbers = _NUMBER.findall(output)
    return bool(numbers) and _as_number(numbers[-1]) == expected


def _device(model) -> torch.device:
    from ..runtime.distributed import device  # DeepSpeed's accelerator: only where a process group may exist

    return device() if dist.is_initialized() else next(model.parameters()).device


def _pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


@torch.no_grad()
def _generate(model, tokenizer, examples: list[dict], max_new_tokens: int, synced: bool) -> list[dict]:
    """Greedy continuations of a batch of prompts that share their stop strings."""
    from transformers import GenerationConfig

    stop = tuple(examples[0].get("stop", DEFAULT_STOP))
    prompts = [prompt_ids(tokenizer, e["prompt"]) for e in examples]
    width = max(map(len, prompts))
    pad = _pad_id(tokenizer)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=_device(model))
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=ids.device)
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=tokenizer.eos_token_id,
                              pad_token_id=pad, stop_strings=list(stop))
    output = model.generate(ids, attention_mask=mask, generation_config=config, tokenizer=tokenizer,
                            synced_gpus=synced)
    results = []
    for example, row in zip(examples, output[:, width:].tolist()):
        # A row that finished early is padded; where the pad is EOS, a row that met a stop string first
        # shows that string before its first EOS.
        new = row[:row.index(tokenizer.eos_token_id)] if tokenizer.eos_token_id in row else row
        text = tokenizer.decode(new, skip_special_tokens=True)
        ended = len(new) < len(row) and not any(s in text for s in stop)
        for s in stop:
            text = text.split(s)[0]
        results.append({"output": text, "ended_with_eos": ended, "correct": is_correct(text, example["answer"])})
    return results


def _generation_batches(examples: tuple[dict, ...]) -> list[list[int]]:
    """Consecutive examples with the same stop strings, at most GENERATION_BATCH at a time."""
    batches: list[list[int]] = []
    for i, example in enumerate(examples):
        stop = example.get("stop", DEFAULT_STOP)
        last = batches[-1] if batches else None
        if last and len(last) < GENERATION_BATCH and examples[last[0]].get("stop", DEFAULT_STOP) == stop:
            last.append(i)
        else:
            batches.append([i])
    return batches


@torch.no_grad()
def _choose(model, tokenizer, example: dict) -> dict:
    """Log-likelihood of each choice after the prompt, all choices in one right-padded batch."""
    # As lm-evaluation-harness: the continuation is what encoding prompt + choice adds after the prompt's tokens.
    start = len(prompt_ids(tokenizer, example["prompt"]))
    rows = [prompt_ids(tokenizer, f"{example['prompt']} {choice}") for choice in example["choices"]]
    spans = [(start, len(row)) for row in rows]
    length = max(map(len, rows))
    pad = _pad_id(tokenizer)
    ids = torch.tensor([r + [pad] * (length - len(r)) for r in rows], device=_device(model))
    mask = torch.tensor([[1] * len(r) + [0] * (length - len(r)) for r in rows], device=ids.device)
    logprobs = F.log_softmax(model(input_ids=ids, attention_mask=mask, use_cache=False).logits.double(), dim=-1)
    scores = []
    for row, (start, stop) in enumerate(spans):
        targets = ids[row, start:stop]
        scores.append(logprobs[row, start - 1:stop - 1].gather(1, targets[:, None]).sum().item())
    lengths = [float(len(c)) for c in example["choices"]]
    chosen = max(range(len(scores)), key=lambda i: scores[i])
    chosen_norm = max(range(len(scores)), key=lambda i: scores[i] / lengths[i])
    return {"loglikelihoods": scores, "choice": chosen, "choice_norm": chosen_norm,
            "correct": chosen == example["label"], "correct_norm": chosen_norm == example["label"]}


def evaluate_task(model, tokenizer, task: Task, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
                  show_progress: bool = True) -> TaskResult:
    """Score `model` (plain, or partitioned under ZeRO-3 with every rank calling this) on `task`. Every
    rank returns the same result."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    n = len(task.examples)
    units = _generation_batches(task.examples) if task.kind == "generation" else [[i] for i in range(n)]
    mine = units[rank::world]
    rounds = -(-len(units) // world)
    was_training = model.training
    model.eval()
    scored = []
    for r in tqdm(range(rounds), desc=f"eval {task.name}", disable=not show_progress):
        unit = mine[r] if r < len(mine) else units[0]  # a repeat keeps this rank in step with the others
        examples = [task.examples[i] for i in unit]
        if task.kind == "generation":
            results = _generate(model, tokenizer, examples, max_new_tokens, synced=world > 1)
        else:
            results = [_choose(model, tokenizer, examples[0])]
        if r < len(mine):
            scored.extend(zip(unit, results))
    model.train(was_training)
    if world > 1:
        every = [None] * world
        dist.all_gather_object(every, scored)
        scored = [item for part in every for item in part]
    predictions = [result for _, result in sorted(scored, key=lambda item: item[0])]
    accuracy, stderr = mean_and_stderr([float(p["correct"]) for p in predictions])
    result = TaskResult(task.name, task.kind, n, accuracy, stderr, predictions=predictions)
    if task.kind == "multiple_choice":
        result.accuracy_norm, result.stderr_norm = mean_and_stderr([float(p["correct_norm"]) for p in predictions])
    else:
        result.ended_with_eos = sum(p["ended_with_eos"] for p in predictions) / n
    return result
