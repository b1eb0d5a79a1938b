"""The quality benchmark's two tasks, generated from fixed seeds: each a training file (prompt/response) and
a held-out task file whose operands never occur in training.

- arith (generation, exact answers): two-step word problems; the response works them out and ends with the
  number, the task checks the output's last number.
- choose (multiple choice): "What is a + b?" or "a * b" with four numeric choices (the sum or product and
  three near misses); trained on the right choice as the response, scored by log-likelihood.
"""

from __future__ import annotations

import json
import random
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
    return (a, b, c), {"prompt": prompt, "response": response}, {"prompt": prompt, "answer": str(total),
                                                                "stop": ["\n"]}


def _choose(rng: random.Random) -> tuple[tuple, dict, dict]:
    if rng.random() < 0.5:
        a, b, op = rng.randint(11, 99), rng.randint(11, 99), "+"
        right = a + b
        wrong = [right + 1, right - 1, right + 10, right - 10]
    else:
        a, b, op = rng.randint(3, 19), rng.randint(3, 12), "*"
        right = a * b
        wrong = [right + a, right - a, right + b, right - b, right + 1]
    distractors = rng.sample(sorted({w for w in wrong if w > 0 and w != right}), 3)
    choices = [str(v) for v in [right, *distractors]]
    rng.shuffle(choices)
    prompt = f"Question: What is {a} {op} {b}?\nAnswer:"
    return (op, a, b), {"prompt": prompt, "response": f" {right}"}, {
        "prompt": prompt, "choices": choices, "label": choices.index(str(right))}


TASKS = {"arith": _arith, "choose": _choose}


def write_task(name: str, folder: Path, n_train: int = 2000, n_test: int = 200, seed: int = 0) -> tuple[Path, Path]:
    """(training .jsonl, held-out task .jsonl) for task `name`, disjoint by operands."""
    make, rng = TASKS[name], random.Random(seed)
    test, held = [], set()
    while len(test) < n_test:
        key, _, example = make(rng)
        if key not in held:
            held.add(key)
            test.append(example)
    train = []
    while len(train) < n_train:
        key, example, _ = make(rng)
        if key not in held:
            train.append(example)
    folder.mkdir(parents=True, exist_ok=True)
    paths = folder / f"{name}_train.jsonl", folder / f"{name}_test.jsonl"
    for path, rows in zip(paths, (train, test)):
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return paths
