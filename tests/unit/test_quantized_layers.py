"""The memory-saving forward of frozen bitsandbytes 4-bit layers gives bitsandbytes' own outputs and input
gradients, bit for bit, for every storage dtype speft-ds uses."""

from __future__ import annotations

import bitsandbytes as bnb
import pytest
import torch
from torch import nn

from speft_ds.models.quantized_layers import _Frozen4bitLinearFn, release_gathered_4bit_weights


def _layer(storage: torch.dtype, quant_type: str) -> nn.Module:
    torch.manual_seed(0)
    dense = nn.Linear(64, 48)
    layer = bnb.nn.Linear4bit(64, 48, compute_dtype=torch.float32, quant_type=quant_type, quant_storage=storage)
    layer.weight = bnb.nn.Params4bit(dense.weight.data.clone(), requires_grad=False, quant_type=quant_type,
                                     quant_storage=storage)
    layer.bias = nn.Parameter(dense.bias.data.clone(), requires_grad=False)
    layer = layer.to("cpu")
    layer.support_avx512bf16_for_cpu = False
    return layer


@pytest.mark.parametrize("storage", [torch.uint8, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_outputs_and_input_gradients_equal_bitsandbytes(storage, quant_type):
    layer = _layer(storage, quant_type)
    x = torch.randn(3, 5, 64, requires_grad=True)
    grad = torch.randn(3, 5, 48)
    want = layer(x)
    want.backward(grad)
    want_grad, x.grad = x.grad, None
    release_gathered_4bit_weights(nn.Sequential(layer))
    got = layer(x)
    assert got.grad_fn.name().endswith(_Frozen4bitLinearFn.__name__ + "Backward")
    got.backward(grad)
    assert torch.equal(got, want) and torch.equal(x.grad, want_grad)
    with torch.no_grad():
        assert torch.equal(layer(x), want)


def test_only_frozen_layers_take_it():
    layer = _layer(torch.uint8, "nf4")
    layer.bias.requires_grad_(True)
    with pytest.raises(ValueError, match="frozen"):
        release_gathered_4bit_weights(nn.Sequential(layer))
