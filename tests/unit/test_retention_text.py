"""--retention_text files: plain text as one document, .jsonl as one document per line, bad lines refused
with their number, and rows cut at --seq_len."""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from speft_ds.config import EMBEDDED_MODEL, ConfigError
from speft_ds.data.retention import read_documents, retention_rows


def test_plain_text_is_one_document_and_jsonl_one_per_line(tmp_path):
    plain = tmp_path / "notes.txt"
    plain.write_text("first line\n\nsecond {not json}\n")
    assert read_documents(plain) == ["first line\n\nsecond {not json}\n"]
    lines = tmp_path / "docs.jsonl"
    lines.write_text(json.dumps({"text": "a"}) + "\n\n" + json.dumps({"text": "b", "id": 2}) + "\n")
    assert read_documents(lines) == ["a", "b"]


@pytest.mark.parametrize("line,problem", [('{"text": "ok"', "line 2: not JSON"), ('{"body": "x"}', "line 2: no string field")])
def test_a_bad_jsonl_line_is_named(tmp_path, line, problem):
    path = tmp_path / "docs.jsonl"
    path.write_text(json.dumps({"text": "fine"}) + "\n" + line + "\n")
    with pytest.raises(ConfigError, match=problem) as err:
        read_documents(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_empty_text_is_refused(tmp_path):
    path = tmp_path / "empty.txt"
    path.write_text(" \n")
    with pytest.raises(ConfigError, match="holds no text"):
        read_documents(path)


def test_rows_are_the_documents_tokens_cut_at_seq_len(tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(EMBEDDED_MODEL)
    documents = ["Tom has 12 apples. " * 5, "Sam."]
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in documents))
    rows = retention_rows(path, tokenizer, seq_len=16)
    expected = []
    for document in documents:
        ids = [tokenizer.bos_token_id] + tokenizer.encode(document, add_special_tokens=False)
        expected += [ids[i:i + 16] for i in range(0, len(ids), 16) if len(ids[i:i + 16]) > 1]
    assert [row["input_ids"] for row in rows] == expected
    assert all(row["labels"] == row["input_ids"] for row in rows)
    assert max(len(row["input_ids"]) for row in rows) == 16 and len(expected[-1]) < 16
