"""bench/quality/quality_tasks.py's splits: training, validation and test share no question, also with commutative
operands swapped or in other words, and the cities task no city. Questions are read back from the prompts
with the tasks' own wording, not with the generator's keys."""

from __future__ import annotations

import json
import re

import pytest

from bench.quality.quality_tasks import FIRST_TEST, TASKS, write_long_train, write_task

ARITH = re.compile(r"has (\d+) \w+\. \w+ gives \w+ (\d+) bags with (\d+) \w+ in each bag")
CHOOSE = re.compile(r"What is (\d+) ([+*]) (\d+)\?")
CITY = re.compile(r"In which country is the city of (.+)\?\nAnswer:$")


def question(prompt: str) -> tuple:
    """The computation a prompt asks for, with the operands of + and * unordered, or the city it asks about."""
    if match := CITY.search(prompt):
        return "city", match.group(1).casefold()
    if match := ARITH.search(prompt):
        a, b, c = map(int, match.groups())
        return "a+b*c", a, frozenset((b, c)) if b != c else (b, b)
    match = CHOOSE.search(prompt)
    assert match, prompt
    a, op, b = match.groups()
    return op, frozenset((int(a), int(b))) if a != b else (int(a), int(a))


def rows(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("name", [*sorted(TASKS), "cities"])
def test_splits_share_no_question_even_with_operands_swapped(tmp_path, name):
    files = write_task(name, tmp_path)
    train, validation, test = rows(files.train), rows(files.validation), rows(files.test)
    assert (len(train), len(validation), len(test)) == (2000, 200, 500)
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


@pytest.mark.parametrize("name", sorted(TASKS))
def test_the_grown_test_split_keeps_the_first_200_and_the_other_files(tmp_path, name):
    """The third protocol's 500 test questions begin with the second's 200; training and validation are those
    the second protocol's cells ran on (written here as it wrote them: 200 test questions)."""
    grown, first = write_task(name, tmp_path / "500"), write_task(name, tmp_path / "200", n_test=FIRST_TEST)
    assert grown.train.read_bytes() == first.train.read_bytes()
    assert grown.validation.read_bytes() == first.validation.read_bytes()
    assert rows(grown.test)[:FIRST_TEST] == rows(first.test)


def test_no_test_city_is_asked_in_training_and_each_answer_is_a_country(tmp_path):
    files = write_task("cities", tmp_path)
    train, validation, test = rows(files.train), rows(files.validation), rows(files.test)
    cities = [[CITY.search(r["prompt"]).group(1) for r in split] for split in (train, validation, test)]
    assert not {c.casefold() for c in cities[2]} & {c.casefold() for c in cities[0] + cities[1]}
    assert len({c.casefold() for c in cities[2]}) == 500
    answers = {r["answer"] for r in test + validation} | {r["response"].strip() for r in train}
    assert {"France", "China", "India", "Brazil"} <= answers and all(a and a[0].isupper() for a in answers)
    lyon = [r for r in train + validation + test if "city of Lyon?" in r["prompt"]]
    assert [r.get("response", r.get("answer")).strip() for r in lyon] == ["France"]


@pytest.mark.parametrize("name", sorted(TASKS))
def test_the_long_training_file_asks_no_held_out_question(tmp_path, name):
    long = rows(write_long_train(name, tmp_path, n_rows=3000))
    files = write_task(name, tmp_path)
    held_out = {question(r["prompt"]) for r in rows(files.validation) + rows(files.test)}
    assert len(long) == 3000 and not {question(r["prompt"]) for r in long} & held_out
