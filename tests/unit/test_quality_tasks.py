"""bench/quality/quality_tasks.py's splits: training, validation and test share no question, also with commutative
operands swapped or in other words. Questions are read back from the prompts
with the tasks' own wording, not with the generator's keys."""

from __future__ import annotations

import json
import re

import pytest

from bench.quality.quality_tasks import TASKS, write_task

ARITH = re.compile(r"has (\d+) \w+\. \w+ gives \w+ (\d+) bags with (\d+) \w+ in each bag")
CHOOSE = re.compile(r"What is (\d+) ([+*]) (\d+)\?")


def question(prompt: str) -> tuple:
    """The computation a prompt asks for, with the operands of + and * unordered."""
    if match := ARITH.search(prompt):
        a, b, c = map(int, match.groups())
        return "a+b*c", a, frozenset((b, c)) if b != c else (b, b)
    match = CHOOSE.search(prompt)
    assert match, prompt
    a, op, b = match.groups()
    return op, frozenset((int(a), int(b))) if a != b else (int(a), int(a))


def rows(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("name", sorted(TASKS))
def test_splits_share_no_question_even_with_operands_swapped(tmp_path, name):
    files = write_task(name, tmp_path)
    train, validation, test = rows(files.train), rows(files.validation), rows(files.test)
    assert (len(train), len(validation), len(test)) == (2000, 200, 200)
    asked = [{question(r["prompt"]) for r in split} for split in (train, validation, test)]
    assert not asked[0] & asked[1] and not asked[0] & asked[2] and not asked[1] & asked[2]
    # the held-out tasks ask each question once
    assert len(asked[1]) == len(validation) and len(asked[2]) == len(test)


def test_the_splits_are_the_same_on_every_call(tmp_path):
    first, second = write_task("choose", tmp_path / "a"), write_task("choose", tmp_path / "b")
    for a, b in ((first.train, second.train), (first.validation, second.validation), (first.test, second.test)):
        assert a.read_bytes() == b.read_bytes()


def test_multiple_choice_labels_point_at_the_right_value(tmp_path):
    for row in rows(write_task("choose", tmp_path).test):
        a, op, b = CHOOSE.search(row["prompt"]).groups()
        value = int(a) + int(b) if op == "+" else int(a) * int(b)
        assert row["choices"][row["label"]] == str(value) and len(set(row["choices"])) == 4
