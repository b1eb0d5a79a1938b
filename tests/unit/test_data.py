"""Tokenisation labels, per-rank calibration/eval batches and the per-rank training order."""

from __future__ import annotations

import datasets
import pytest
import torch
from transformers import AutoTokenizer

from speft_ds.config import EMBEDDED_MODEL, TrainConfig
from speft_ds.config import ConfigError
from speft_ds.data.sources import load_raw_dataset
from speft_ds.data.batches import (rank_batches, tokenize_example, train_eval_split,
                                   train_micro_batches)

IGNORE = -100
PROMPT = "Question: Sam fills 10 bags with 9 apples each. How many apples are in the bags?\nAnswer:"
RESPONSE = " 10 * 9 = 90. The bags hold 90 apples."


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(EMBEDDED_MODEL)


def test_prompt_response_labels(tokenizer):
    """bos + prompt tokens get label -100; response tokens + eos are labelled with themselves."""
    prompt_ids = tokenizer.encode(PROMPT, add_special_tokens=False)
    response_ids = tokenizer.encode(RESPONSE, add_special_tokens=False)
    assert tokenizer.bos_token_id is not None and tokenizer.eos_token_id is not None
    n_prompt = 1 + len(prompt_ids)

    out = tokenize_example({"prompt": PROMPT, "response": RESPONSE}, tokenizer, TrainConfig(seq_len=1024))
    ids, labels = out["input_ids"], out["labels"]
    assert ids == [tokenizer.bos_token_id] + prompt_ids + response_ids + [tokenizer.eos_token_id]
    assert len(labels) == len(ids)
    assert labels[:n_prompt] == [IGNORE] * n_prompt
    assert labels[n_prompt:] == ids[n_prompt:]
    assert IGNORE not in labels[n_prompt:]


def test_custom_field_names(tokenizer):
    config = TrainConfig(prompt_field="q", response_field="a", seq_len=1024)
    renamed = tokenize_example({"q": PROMPT, "a": RESPONSE}, tokenizer, config)
    default = tokenize_example({"prompt": PROMPT, "response": RESPONSE}, tokenizer, TrainConfig(seq_len=1024))
    assert renamed == default


def test_text_field_labels_everything(tokenizer):
    text = PROMPT + RESPONSE
    out = tokenize_example({"text": text, "prompt": "ignored"}, tokenizer, TrainConfig(text_field="text",
                                                                                       seq_len=1024))
    body = tokenizer.encode(text, add_special_tokens=False)
    assert out["input_ids"] == [tokenizer.bos_token_id] + body + [tokenizer.eos_token_id]
    assert out["labels"] == out["input_ids"]


def test_truncation(tokenizer):
    """Both sequences are cut to seq_len; the cut may fall inside the prompt (no label then)."""
    full = tokenize_example({"prompt": PROMPT, "response": RESPONSE}, tokenizer, TrainConfig(seq_len=1024))
    n_prompt = 1 + len(tokenizer.encode(PROMPT, add_special_tokens=False))
    assert len(full["input_ids"]) > n_prompt + 3
    for seq_len in (1, n_prompt - 2, n_prompt, n_prompt + 3):
        out = tokenize_example({"prompt": PROMPT, "response": RESPONSE}, tokenizer, TrainConfig(seq_len=seq_len))
        assert out["input_ids"] == full["input_ids"][:seq_len]
        assert out["labels"] == full["labels"][:seq_len]
        assert len(out["input_ids"]) == seq_len
        n_labelled = sum(label != IGNORE for label in out["labels"])
        assert n_labelled == max(0, seq_len - n_prompt)
    text = tokenize_example({"text": PROMPT}, tokenizer, TrainConfig(text_field="text", seq_len=5))
    assert len(text["input_ids"]) == 5 and text["labels"] == text["input_ids"]


# --------------------------------------------------------------------------- rank_batches

def toy_dataset(n: int) -> datasets.Dataset:
    """Example i has length 2 + (i % 5) tokens, all equal to i + 10 (so a row names its example), and a
    first label of -100 (a one-token "prompt") then labels on the rest."""
    input_ids, labels = [], []
    for i in range(n):
        length = 2 + i % 5
        input_ids.append([i + 10] * length)
        labels.append([IGNORE] + [i + 10] * (length - 1))
    return datasets.Dataset.from_dict({"input_ids": input_ids, "labels": labels})


@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("n_indices,micro_batch_size", [(11, 2), (13, 4), (2, 3), (7, 1)])
def test_rank_batches_cover_each_example_once(world_size, n_indices, micro_batch_size):
    """Every rank gets as many batches as the busiest rank needs; the real rows over all ranks are the
    index set, each once and intact; filler batches carry no label."""
    n = 20
    ds = toy_dataset(n)
    indices = torch.randperm(n, generator=torch.Generator().manual_seed(n_indices))[:n_indices].tolist()
    pad_id = 0

    per_rank = [rank_batches(ds, indices, rank, world_size, micro_batch_size, pad_id) for rank in range(world_size)]
    counts = {len(b) for b in per_rank}
    assert len(counts) == 1, f"ranks got different numbers of batches: {[len(b) for b in per_rank]}"

    seen, real_per_rank = [], []
    for rank, batches in enumerate(per_rank):
        real_rows = 0
        for batch in batches:
            ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
            assert ids.dtype == labels.dtype == mask.dtype == torch.int64
            assert ids.shape == labels.shape == mask.shape and 1 <= ids.shape[0] <= micro_batch_size
            if (labels == IGNORE).all():
                continue  # a filler batch: contributes nothing to any loss sum
            assert (labels != IGNORE).any(dim=1).all(), "a batch mixes real rows and label-free rows"
            for row in range(ids.shape[0]):
                example = int(ids[row, 0]) - 10
                expected = ds[example]
                length = len(expected["input_ids"])
                assert ids[row, :length].tolist() == expected["input_ids"]
                assert labels[row, :length].tolist() == expected["labels"]
                assert mask[row, :length].eq(1).all() and mask[row, length:].eq(0).all()
                assert labels[row, length:].eq(IGNORE).all() and ids[row, length:].eq(pad_id).all()
                seen.append(example)
                real_rows += 1
        real_per_rank.append(real_rows)

    assert sorted(seen) == sorted(indices), "real examples over all ranks must be the index set, each once"
    busiest = max(-(-r // micro_batch_size) for r in real_per_rank)
    assert counts == {max(busiest, 1)}, "no rank gets more batches than the busiest rank needs"


def test_rank_batches_filler_when_rank_has_no_example():
    """More ranks than examples: the empty rank still gets one batch, with no label."""
    ds = toy_dataset(5)
    batches = rank_batches(ds, [3, 1], rank=2, world_size=3, micro_batch_size=4, pad_id=0)
    assert len(batches) == 1 and (batches[0]["labels"] == IGNORE).all()


# --------------------------------------------------------------------------- train_micro_batches

@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("n_train,micro_batch_size", [(23, 3), (24, 4), (10, 5)])
def test_train_micro_batches_partition_one_epoch(world_size, n_train, micro_batch_size):
    """Ranks' slices of an epoch are disjoint, full-size, inside the training set and reproducible."""
    epoch, seed = 1, 1234
    per_rank = [train_micro_batches(n_train, epoch, seed, rank, world_size, micro_batch_size)
                for rank in range(world_size)]
    steps = n_train // (micro_batch_size * world_size)
    assert all(len(batches) == steps for batches in per_rank)
    everything = [i for batches in per_rank for batch in batches for i in batch]
    assert all(len(batch) == micro_batch_size for batches in per_rank for batch in batches)
    assert len(everything) == len(set(everything)) == steps * micro_batch_size * world_size
    assert all(0 <= i < n_train for i in everything)

    again = [train_micro_batches(n_train, epoch, seed, rank, world_size, micro_batch_size)
             for rank in range(world_size)]
    assert again == per_rank

    # One global order: step j's slices over the ranks, joined, are step j of a single rank with
    # micro_batch_size x world_size examples.
    single = train_micro_batches(n_train, epoch, seed, 0, 1, micro_batch_size * world_size)
    for step in range(steps):
        assert [i for rank in range(world_size) for i in per_rank[rank][step]] == single[step]


def test_train_micro_batches_depend_on_seed_and_epoch():
    base = train_micro_batches(64, 0, 7, 0, 2, 4)
    assert train_micro_batches(64, 1, 7, 0, 2, 4) != base
    assert train_micro_batches(64, 0, 8, 0, 2, 4) != base
    assert train_micro_batches(64, 0, 7, 1, 2, 4) != base


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".parquet", ".csv"])
def test_local_dataset_formats_load_the_same_rows(tmp_path, suffix):
    """Every local format the CLI accepts is read through `datasets` with the same rows and fields."""
    rows = [{"prompt": f"Question {i}?", "response": f" answer {i}"} for i in range(5)]
    path = tmp_path / f"data{suffix}"
    table = datasets.Dataset.from_list(rows)
    if suffix == ".jsonl":
        table.to_json(path, lines=True)
    elif suffix == ".json":
        table.to_json(path, lines=False)
    elif suffix == ".parquet":
        table.to_parquet(path)
    else:
        table.to_csv(path, index=False)
    loaded = load_raw_dataset(TrainConfig(dataset=str(path)))
    assert loaded.to_list() == rows


def _examples(prompts: list[str], tokenizer, config: TrainConfig) -> datasets.Dataset:
    rows = [tokenize_example({"prompt": p, "response": f" {i}"}, tokenizer, config) for i, p in enumerate(prompts)]
    return datasets.Dataset.from_list(rows)


def test_held_out_split_drops_examples_whose_prompt_training_has(tokenizer):
    """Repeated prompts (different responses) land on both sides of datasets' split; the held-out side keeps
    only prompts training never shows, and training is datasets' split unchanged."""
    config = TrainConfig(seq_len=1024)
    prompts = [f"Question: what is {i % 20} plus one?\nAnswer:" for i in range(60)]  # 20 prompts 3 times each
    prompts += [f"Question: what is {i} plus two?\nAnswer:" for i in range(40)]  # and 40 once
    tokenized = _examples(prompts, tokenizer, config)
    plain = tokenized.train_test_split(test_size=0.2, seed=3, shuffle=True)
    train, held_out = train_eval_split(tokenized, 0.2, seed=3)
    assert train["input_ids"] == plain["train"]["input_ids"]
    prompt_of = {tuple(r["input_ids"]): p for r, p in zip(tokenized, prompts)}
    train_prompts = {prompt_of[tuple(ids)] for ids in train["input_ids"]}
    expected = [ids for ids in plain["test"]["input_ids"] if prompt_of[tuple(ids)] not in train_prompts]
    assert 0 < len(expected) < len(plain["test"])  # the case is one where the split mixes them
    assert held_out["input_ids"] == expected


def test_held_out_split_of_plain_text_drops_repeated_texts(tokenizer):
    config = TrainConfig(text_field="text", seq_len=1024)
    texts = [f"line {i % 10}" for i in range(40)] + [f"unique {i}" for i in range(40)]
    tokenized = datasets.Dataset.from_list([tokenize_example({"text": t}, tokenizer, config) for t in texts])
    train, held_out = train_eval_split(tokenized, 0.25, seed=0)
    plain = tokenized.train_test_split(test_size=0.25, seed=0, shuffle=True)
    seen = {tuple(ids) for ids in train["input_ids"]}
    assert held_out["input_ids"] == [ids for ids in plain["test"]["input_ids"] if tuple(ids) not in seen]
    assert 0 < len(held_out) < len(plain["test"])


def test_held_out_split_that_only_repeats_training_prompts_is_refused(tokenizer):
    config = TrainConfig(seq_len=1024)
    tokenized = _examples(["Question: the same?\nAnswer:"] * 20, tokenizer, config)
    with pytest.raises(ConfigError, match="repeats a training prompt"):
        train_eval_split(tokenized, 0.1, seed=0)
