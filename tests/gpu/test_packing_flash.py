"""--packing under flash_attention_2 on a GPU: a packed row's logits equal each example's own, as
tests/unit/test_packing.py checks for sdpa and eager on CPU (flash-attention's variable-length path reads the
restarting position ids). Skipped where flash-attn does not import."""

from __future__ import annotations

import datasets
import pytest
import torch
from transformers import AutoModelForCausalLM

from speft_ds.config import EMBEDDED_MODEL
from speft_ds.data.batches import collate, model_inputs, pack

pytestmark = pytest.mark.gpu


def test_attention_stays_inside_each_packed_example_with_flash_attention_2():
    pytest.importorskip("flash_attn", reason="flash-attn is not installed (bench/gpu/gpu_wheels.py leaves it out)")
    model = AutoModelForCausalLM.from_pretrained(EMBEDDED_MODEL, attn_implementation="flash_attention_2",
                                                 dtype=torch.bfloat16).cuda().eval()
    examples = [[5, 17, 33, 8, 90], [7, 7, 41], [12, 60, 3, 3, 28, 9]]
    tokenized = datasets.Dataset.from_dict({"input_ids": examples, "labels": examples})
    row = {key: value.cuda() for key, value in collate([pack(tokenized, seq_len=14)[0]], pad_id=0).items()}
    with torch.no_grad():
        packed = model(**model_inputs(row), use_cache=False).logits[0].float()
        alone = torch.cat([model(input_ids=torch.tensor([e], device="cuda"), use_cache=False).logits[0].float()
                           for e in examples])
    # bf16 throughout: each logit rounded to 8 significant bits, as in tests/gpu/test_delta_cuda.py's bound
    assert (packed - alone).abs().max() <= 2e-2 * alone.abs().max()
