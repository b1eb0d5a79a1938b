"""The quality benchmark's two tasks, generated from fixed seeds: a training file (prompt/response), a
validation task carved from the training side of the split (every choice of rate, density or strategy is
made on it) and a held-out test task, the three disjoint by their question's operands with commutative
operands unordered: "3 * 7" and "7 * 3" are one question, on one side only.

- arith (generation, exact answers): two-step word problems a + b x c; the response works them out and ends
  with the number, the task checks the output's last number.
- choose (multiple choice): "What is a + b?" or "a * b" with four numeric choices (the sum or product and
  three near misses); trained on the right choice as the response, scored by log-likelihood.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

NAMES = ["Tom", "Anna", "Ravi", "Mei", "Omar", "Lena", "Sam", "Ines", "Kofi", "Yuki", "Ben", "Sara"]
THINGS = ["apples", "books", "coins", "pens", "cards", "stones", "shells", "stamps", "eggs", "marbles"]


def _arith(rng: random.Random) -> tuple[tuple, dict, dict]:
    name, other = rng.sample(NAMES, 2)
    thing = rng.choice(THINGS)
    a, b, c = rng.randint(5, 60), rng.randint(2, 9), rng.randint(2, 40)
    total = a + b * c
    prompt = (f"Question: {name} has {a} {thing}. {other} gives {name} {b} bags with {c} {thing} in each bag. "
              f"How many {thing} does {name} have now?\nAnswer:")
    response = f" {b} * {c} = {b * c}. {a} + {b * c} = {total}. The answer is {total}."
    # b bags of c and c bags of b are one computation: the question's key leaves their order out
    return (a, min(b, c), max(b, c)), {"prompt": prompt, "response": response}, {
        "prompt": prompt, "answer": str(total), "stop": ["\n"]}


def _choose(rng: random.Random) -> tuple[tuple, dict, dict]:
    if rng.random() < 0.5:
        a, b, op = rng.randint(11, 99), rng.randint(11, 99), "+"
        right = a + b
        wrong = [right + 1, right - 1, right + 10, right - 10]
    else:
        # wide enough that holding out whole unordered pairs leaves most products to train on
        a, b, op = rng.randint(3, 39), rng.randint(3, 12), "*"
        right = a * b
        wrong = [right + a, right - a, right + b, right - b, right + 1]
    distractors = rng.sample(sorted({w for w in wrong if w > 0 and w != right}), 3)
    choices = [str(v) for v in [right, *distractors]]
    rng.shuffle(choices)
    prompt = f"Question: What is {a} {op} {b}?\nAnswer:"
    return (op, min(a, b), max(a, b)), {"prompt": prompt, "response": f" {right}"}, {
        "prompt": prompt, "choices": choices, "label": choices.index(str(right))}


TASKS = {"arith": _arith, "choose": _choose}


@dataclass(frozen=True)
class TaskFiles:
    train: Path       # prompt/response rows to train on
    validation: Path  # a task file: what every choice is made on
    test: Path        # a task file: scored once per chosen setting


def _held_out(make, rng: random.Random, n: int, taken: set) -> list[dict]:
    """n task examples with distinct keys none of which is in `taken` (which then holds theirs too)."""
    examples = []
    while len(examples) < n:
        key, _, example = make(rng)
        if key not in taken:
            taken.add(key)
            examples.append(example)
    return examples


def write_task(name: str, folder: Path, n_train: int = 2000, n_validation: int = 200, n_test: int = 200,
               seed: int = 0) -> TaskFiles:
    """Task `name`'s three files in `folder`: test keys first, then validation keys among the rest, then
    training rows on the keys neither holds."""
    make, rng = TASKS[name], random.Random(seed)
    taken: set = set()
    test = _held_out(make, rng, n_test, taken)
    validation = _held_out(make, rng, n_validation, taken)
    train = []
    while len(train) < n_train:
        key, example, _ = make(rng)
        if key not in taken:
            train.append(example)
    folder.mkdir(parents=True, exist_ok=True)
    files = TaskFiles(folder / f"{name}_train.jsonl", folder / f"{name}_validation.jsonl", folder / f"{name}_test.jsonl")
    for path, rows in ((files.train, train), (files.validation, validation), (files.test, test)):
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return files
