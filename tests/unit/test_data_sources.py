"""Datasets as users have them (speft_ds/data/sources.py): several mixed by weight with a held-out carve from
each, a separate --eval_dataset, --val_size 0, and non-UTF-8 files named with the byte where they fail."""

from __future__ import annotations

import json
from collections import Counter

import pytest
from transformers import AutoTokenizer

from speft_ds.cli import parse_config
from speft_ds.config import EMBEDDED_MODEL, ConfigError, TrainConfig
from speft_ds.data.sources import training_and_eval_sets


def _write(path, tag: str, n: int):
    path.write_text("".join(json.dumps({"prompt": f"{tag} question {i}?", "response": f" {tag} {i}"}) + "\n"
                            for i in range(n)))
    return path


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(EMBEDDED_MODEL)


def _tags(dataset, tokenizer) -> Counter:
    return Counter(tokenizer.decode(row["input_ids"]).split()[1] for row in dataset)


def test_a_weighted_mixture_carves_its_held_out_set_from_each_dataset(tmp_path, tokenizer):
    a, b = _write(tmp_path / "a.jsonl", "alpha", 40), _write(tmp_path / "b.jsonl", "beta", 20)
    config = TrainConfig(model=str(EMBEDDED_MODEL), dataset=f"{a},{b}", dataset_weights="0.5,2", val_size=0.25,
                         seq_len=64)
    config.check()
    train, held_out = training_and_eval_sets(config, tokenizer)
    # 30 and 15 training examples: half of the first once, the second twice over
    assert _tags(train, tokenizer) == {"alpha": 15, "beta": 30}
    assert _tags(held_out, tokenizer) == {"alpha": 10, "beta": 5}
    seen = {tuple(row["input_ids"]) for row in train}
    assert not seen & {tuple(row["input_ids"]) for row in held_out}


def test_an_eval_dataset_replaces_the_carve_and_val_size_0_means_none(tmp_path, tokenizer):
    a, held = _write(tmp_path / "a.jsonl", "alpha", 12), _write(tmp_path / "held.jsonl", "gamma", 5)
    train, held_out = training_and_eval_sets(TrainConfig(model=str(EMBEDDED_MODEL), dataset=str(a),
                                                         eval_dataset=str(held), seq_len=64), tokenizer)
    assert len(train) == 12 and _tags(held_out, tokenizer) == {"gamma": 5}
    train, held_out = training_and_eval_sets(TrainConfig(model=str(EMBEDDED_MODEL), dataset=str(a), val_size=0,
                                                         seq_len=64), tokenizer)
    assert len(train) == 12 and held_out is None


@pytest.mark.parametrize("flags,message", [
    (["--dataset_weights", "1"], r"--dataset_weights 1 needs one number > 0 per --dataset \(2\)"),
    (["--dataset_weights", "1,-1"], "needs one number > 0"),
])
def test_weights_must_match_the_datasets(tmp_path, flags, message):
    a, b = _write(tmp_path / "a.jsonl", "alpha", 4), _write(tmp_path / "b.jsonl", "beta", 4)
    with pytest.raises(ConfigError, match=message):
        parse_config(["--model", str(EMBEDDED_MODEL), "--dataset", f"{a},{b}", *flags])


@pytest.mark.parametrize("flag", ["--dataset", "--eval_dataset", "--config"])
def test_a_file_that_is_not_utf8_is_named_with_the_byte(tmp_path, flag):
    bad = tmp_path / ("bad.yaml" if flag == "--config" else "bad.jsonl")
    text = '{"prompt": "Caf\xe9?", "response": " yes"}\n' if flag != "--config" else "seed: 3  # caf\xe9\n"
    bad.write_bytes(text.encode("latin-1"))
    at = text.encode("latin-1").index(b"\xe9")
    with pytest.raises(ConfigError, match=f"^{flag} {bad} is not UTF-8 at byte {at} \\(0xe9\\): convert it"):
        parse_config(["--model", str(EMBEDDED_MODEL), flag, str(bad)])


def test_a_held_out_example_asks_nothing_another_dataset_trains_on(tmp_path, tokenizer):
    a = _write(tmp_path / "a.jsonl", "alpha", 20)
    b = tmp_path / "b.jsonl"
    b.write_text("".join(reversed(a.read_text().splitlines(keepends=True))))  # the same prompts, another order
    config = TrainConfig(model=str(EMBEDDED_MODEL), dataset=f"{a},{b}", val_size=0.25, seq_len=64)
    train, held_out = training_and_eval_sets(config, tokenizer)
    assert not {tuple(r["input_ids"]) for r in train} & {tuple(r["input_ids"]) for r in held_out}
    assert len(held_out) > 0


def test_a_folder_of_data_files_is_read_as_datasets_reads_one(tmp_path, tokenizer):
    folder = tmp_path / "data"
    folder.mkdir()
    _write(folder / "part1.jsonl", "alpha", 6)
    _write(folder / "part2.jsonl", "beta", 4)
    config, _ = parse_config(["--model", str(EMBEDDED_MODEL), "--dataset", str(folder), "--val_size", "0",
                              "--seq_len", "64"])
    train, _ = training_and_eval_sets(config, tokenizer)
    assert _tags(train, tokenizer) == {"alpha": 6, "beta": 4}
