"""The embedded demo's data: a held-out task disjoint from training by operation and operands (in either
order for + and *), and a
tokenizer that keeps numbers readable."""

from __future__ import annotations

import json
import re

from transformers import AutoTokenizer

from speft_ds.config import EMBEDDED_DATASET, EMBEDDED_MODEL, EMBEDDED_TASK
from speft_ds.data.task_eval import is_correct, load_task

# The three problem templates of launch/make_tiny_llama.py, each giving (operation, operands).
TEMPLATES = [
    (re.compile(r"has (\d+) \w+\. \w+ gets (\d+) more"), "+"),
    (re.compile(r"had (\d+) \w+ and gave (\d+) to"), "-"),
    (re.compile(r"fills (\d+) bags with (\d+) \w+ each"), "*"),
]


def problem_key(prompt: str) -> tuple:
    """(operation, operands) of a prompt, the operands of + and * in ascending order (3 * 7 is 7 * 3)."""
    for pattern, operation in TEMPLATES:
        match = pattern.search(prompt)
        if match:
            operands = tuple(map(int, match.groups()))
            return (operation, *(operands if operation == "-" else sorted(operands)))
    raise AssertionError(f"no template matches {prompt!r}")


def test_held_out_task_shares_no_operation_and_operands_with_training_in_either_order():
    train = {problem_key(json.loads(line)["prompt"]) for line in EMBEDDED_DATASET.read_text().splitlines()}
    task = load_task(EMBEDDED_TASK)
    assert task.kind == "generation" and len(task.examples) == 200
    held_out = [problem_key(e["prompt"]) for e in task.examples]
    assert len(set(held_out)) == len(held_out) and not set(held_out) & train
    assert {key[0] for key in held_out} == {"+", "-", "*"}
    for example, (operation, *operands) in zip(task.examples, held_out):
        value = operands[0] * operands[1] if operation == "*" else (
            operands[0] - operands[1] if operation == "-" else sum(operands))
        assert example["answer"] == str(value)


def test_no_trivial_rule_answers_much_of_the_held_out_task():
    """The demo's accuracy means something only above what a rule without a model gets."""
    task = load_task(EMBEDDED_TASK).examples
    numbers = [[int(n) for n in re.findall(r"\d+", e["prompt"])] for e in task]
    most_common = max({e["answer"] for e in task}, key=[e["answer"] for e in task].count)
    rules = {"most common answer": lambda ns: most_common, "first number": lambda ns: ns[0],
             "last number": lambda ns: ns[-1], "sum": sum, "difference": lambda ns: ns[0] - ns[1],
             "product": lambda ns: ns[0] * ns[1]}
    for name, rule in rules.items():
        accuracy = sum(str(rule(ns)) == e["answer"] for ns, e in zip(numbers, task)) / len(task)
        assert accuracy <= 0.4, (name, accuracy)


def test_training_responses_end_with_the_task_answer_as_their_last_number():
    for line in EMBEDDED_DATASET.read_text().splitlines()[:200]:
        example = json.loads(line)
        operation, *operands = problem_key(example["prompt"])
        value = operands[0] * operands[1] if operation == "*" else (
            operands[0] - operands[1] if operation == "-" else sum(operands))
        assert is_correct(example["response"], str(value)), example


def test_numbers_decode_as_they_were_written():
    tokenizer = AutoTokenizer.from_pretrained(EMBEDDED_MODEL)
    text = "Question: Sam fills 10 bags with 9 apples each.\nAnswer: 10 * 9 = 90. The bags hold 90 apples."
    assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text
    response = tokenizer.encode(" 10 * 9 = 90.", add_special_tokens=False)
    assert tokenizer.decode(response) == "10 * 9 = 90."  # a response's first space is the word-boundary mark
