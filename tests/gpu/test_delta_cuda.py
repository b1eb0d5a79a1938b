"""The delta layer's two implementations (--delta_impl dense and sparse) on CUDA in fp32 and bf16: outputs,
value gradients and input gradients agree with each other and with plain torch (F.linear on W + D), in both
forms: merged (a plain weight takes the delta) and additive (the delta's product alone, for quantized bases).
tests/unit/test_delta.py checks the same arithmetic on CPU."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from speft_ds.methods.speft.delta import SparseDeltaLinear
from speft_ds.methods.speft.delta_impls import delta_product
from tests.unit.test_delta import build_indices, make_base, reference_dense

pytestmark = pytest.mark.gpu

OUT, IN = 256, 384
IMPLS = ("dense", "sparse")
# Largest error allowed, relative to the reference's largest magnitude. fp32: the implementations reduce in
# other orders than the reference (cuBLAS GEMM, cuSPARSE SDDMM and SpMM). bf16: inputs, W + D, outputs and
# (dense) value gradients are each rounded to 8 significant bits (0.4%).
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2}


def assert_near(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    error = (actual.float() - expected.float()).abs().max().item()
    scale = expected.float().abs().max().item()
    assert error <= TOLERANCE[dtype] * scale, f"{what}: max error {error:.3e}, {error / scale:.2e} of max |ref|"


def case(kind: str, dtype: torch.dtype, seed: int = 0):
    """Frozen base layer (CUDA, dtype), flat indices, fp32 values, input and the upstream gradient."""
    gen = torch.Generator().manual_seed(seed)
    base = make_base(OUT, IN, gen, dtype).cuda()
    indices = build_indices(kind, OUT, IN, gen)
    values = torch.randn(indices.numel(), generator=gen)
    x = torch.randn(4, 16, IN, generator=gen).to("cuda", dtype)
    upstream = torch.randn(4, 16, OUT, generator=gen).cuda()
    return base, indices.cuda(), values.cuda(), x, upstream


def reference(x, upstream, weight, bias, values, indices):
    """(output, value gradients, input gradients) of F.linear(x, W + D, b) in fp32, D a dense leaf."""
    D = reference_dense(values.cpu(), indices.cpu(), (OUT, IN)).cuda().requires_grad_(True)
    x_ref = x.detach().float().requires_grad_(True)
    out = F.linear(x_ref, weight.float() + D, None if bias is None else bias.float())
    (out * upstream).sum().backward()
    return out.detach(), D.grad.view(-1)[indices], x_ref.grad


def check(results: dict, expected: tuple, dtype: torch.dtype) -> None:
    for impl, got in results.items():
        for name, a, b in zip(("output", "value grads", "input grads"), got, expected):
            assert_near(a, b, dtype, f"{impl} {name} vs torch")
    for name, a, b in zip(("output", "value grads", "input grads"), results["dense"], results["sparse"]):
        assert_near(a, b, dtype, f"dense vs sparse {name}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kind", ["random", "empty_rows"])
def test_merged_layer_impls_agree_with_torch(kind, dtype):
    base, indices, values, x, upstream = case(kind, dtype)
    results = {}
    for impl in IMPLS:
        layer = SparseDeltaLinear(base, indices, values, impl).cuda()
        x_in = x.clone().requires_grad_(True)
        out = layer(x_in)
        assert out.dtype == dtype and layer.delta_values.dtype == torch.float32
        (out.float() * upstream).sum().backward()
        results[impl] = (out.detach(), layer.delta_values.grad, x_in.grad)
    # The reference sees the upstream gradient as the layer's bf16 output receives it.
    check(results, reference(x, upstream.to(dtype).float(), base.weight, base.bias, values, indices), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kind", ["random", "empty_rows"])
def test_additive_form_impls_agree_with_torch(kind, dtype):
    _, indices, values, x, upstream = case(kind, dtype, seed=1)
    results = {}
    for impl in IMPLS:
        leaf = values.clone().requires_grad_(True)
        x_in = x.clone().requires_grad_(True)
        out = delta_product(x_in, leaf, indices.to(torch.int32), (OUT, IN), impl)
        assert out.dtype == dtype
        (out.float() * upstream).sum().backward()
        results[impl] = (out.detach(), leaf.grad, x_in.grad)
    zero = torch.zeros(OUT, IN, device="cuda")
    check(results, reference(x, upstream.to(dtype).float(), zero, None, values, indices), dtype)
