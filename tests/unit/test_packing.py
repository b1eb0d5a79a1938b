"""--packing: examples end to end in rows of exactly seq_len tokens, positions restarting per example, no loss
across a boundary; and the model's attention stays inside each example (logits equal to each example's own)."""

from __future__ import annotations

import datasets
import pytest
import torch
from transformers import AutoModelForCausalLM

from speft_ds.config import EMBEDDED_MODEL, ConfigError, TrainConfig
from speft_ds.data.batches import collate, model_inputs, pack

IGNORE = -100


def test_rows_hold_the_examples_end_to_end():
    tokenized = datasets.Dataset.from_dict({"input_ids": [[1, 2, 3], [4, 5], [6, 7, 8, 9]],
                                            "labels": [[1, 2, 3], [IGNORE, 5], [6, 7, 8, 9]]})
    packed = pack(tokenized, seq_len=4)  # 9 tokens: two rows, the ninth dropped
    assert packed["input_ids"] == [[1, 2, 3, 4], [5, 6, 7, 8]]
    assert packed["labels"] == [[IGNORE, 2, 3, IGNORE], [5, IGNORE, 7, 8]]
    assert packed["position_ids"] == [[0, 1, 2, 0], [1, 0, 1, 2]]
    batch = collate([packed[0], packed[1]], pad_id=0)
    assert set(batch) == {"input_ids", "labels", "position_ids"} and set(model_inputs(batch)) == {"input_ids",
                                                                                                 "position_ids"}
    with pytest.raises(ConfigError, match="fewer than one row of --seq_len 16"):
        pack(tokenized, seq_len=16)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_attention_stays_inside_each_packed_example(attn):
    model = AutoModelForCausalLM.from_pretrained(EMBEDDED_MODEL, attn_implementation=attn).eval()
    examples = [[5, 17, 33, 8, 90], [7, 7, 41], [12, 60, 3, 3, 28, 9]]
    tokenized = datasets.Dataset.from_dict({"input_ids": examples, "labels": examples})
    row = collate([pack(tokenized, seq_len=14)[0]], pad_id=0)
    with torch.no_grad():
        packed_logits = model(**model_inputs(row), use_cache=False).logits[0]
        alone = [model(input_ids=torch.tensor([e]), use_cache=False).logits[0] for e in examples]
    torch.testing.assert_close(packed_logits, torch.cat(alone), rtol=1e-5, atol=1e-5)


def test_packing_is_for_plain_text():
    with pytest.raises(ConfigError, match="use it with --text_field"):
        TrainConfig(model=str(EMBEDDED_MODEL), packing=True).check()
