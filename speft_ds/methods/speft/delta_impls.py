"""The arithmetic of a linear layer with a sparse delta, y = x @ (W + D)^T + b, D = scatter(indices, values),
two ways (--delta_impl), each in two forms.

Value gradients:
  dense:  the dense weight gradient grad^T x (a matmul as large as the layer's), read at the indices.
  sparse: a sampled dense-dense product over the selected entries only (torch.sparse.sampled_addmm):
          1.5-4 ms at 1% density on one CPU core, where the dense matmul of a 768 x 2048 layer takes 30 ms.
Forms:
  merged:   a plain weight W takes the delta: W + D is built per call, used for the output and again in
            backward for the input gradient, never kept. Two matmuls plus the value gradients, and no
            elementwise sums of a separate delta branch (those cost as much as the sparse work on CPU).
  additive: a weight that cannot take the delta (bitsandbytes-quantized) keeps its own layer call, plus
            the delta's product: a dense delta (dense) or CSR products (sparse).
CPU sparse kernels have no bf16, so the sparse work runs in fp32. Measurements: docs/perf_notes.md.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F


def resolve(impl: str, device_type: str) -> str:
    """'auto' picks by measurement: sparse on CPU, dense on accelerators (whose matmuls are cheap)."""
    if impl != "auto":
        return impl
    return "sparse" if device_type == "cpu" else "dense"


def dense_delta(values: torch.Tensor, indices: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """scatter(indices, values) as a dense tensor of `shape`."""
    delta = values.new_zeros(shape[0] * shape[1])
    delta[indices] = values
    return delta.view(shape)


def add_delta_(weight: torch.Tensor, indices: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """weight += scatter(indices, values) in place; summed in fp32 and rounded once to the weight's dtype.
    Indices are unique, so the gather-add-scatter is exact."""
    flat = weight.view(-1)
    flat[indices] = (flat[indices].float() + values.float()).to(weight.dtype)
    return weight


def linear_weight_grad(x: torch.Tensor, grad_out: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """dL/dW of y = x W^T: grad_out^T x over all leading dimensions."""
    return grad_out.reshape(-1, shape[0]).t().to(x.dtype) @ x.reshape(-1, shape[1])


def _csr(values: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, n_rows: int, n_cols: int) -> torch.Tensor:
    """A CSR matrix from entries sorted by (row, col)."""
    crow = torch.zeros(n_rows + 1, dtype=cols.dtype, device=cols.device)
    crow[1:] = torch.bincount(rows, minlength=n_rows).cumsum(0)
    with warnings.catch_warnings():  # torch calls CSR support beta (once per process); it is tested here
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state", category=UserWarning)
        # torch 2.11 on CUDA warns that invariant checks are off even when told so; the entries are unique
        # and sorted by construction
        warnings.filterwarnings("ignore", message="Sparse invariant checks are implicitly disabled",
                                category=UserWarning)
        return torch.sparse_csr_tensor(crow, cols, values, (n_rows, n_cols), check_invariants=False)


def _value_grads(impl: str, x: torch.Tensor, grad_out: torch.Tensor, indices: torch.Tensor,
                 shape: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
    """dL/d values = (grad_out^T x) at the indices."""
    if impl == "dense":
        return linear_weight_grad(x, grad_out, shape).view(-1)[indices].to(dtype)
    rows, cols = indices // shape[1], indices % shape[1]
    grad = grad_out.reshape(-1, shape[0]).float()
    # The pattern's own values count times beta = 0.
    pattern = _csr(grad.new_zeros(indices.numel()), rows, cols, *shape)
    with torch.autocast(grad.device.type, enabled=False):  # the sparse kernels are fp32 only
        sampled = torch.sparse.sampled_addmm(pattern, grad.t(), x.reshape(-1, shape[1]).float(), beta=0.0)
    return sampled.values().to(dtype)


class _MergedLinearFn(torch.autograd.Function):
    """x @ (W + D)^T + b, rebuilding W + D in backward instead of saving it."""

    @staticmethod
    def forward(ctx, x, weight, bias, values, indices, impl: str):
        ctx.save_for_backward(x, weight, values, indices)
        ctx.impl = impl
        return F.linear(x, add_delta_(weight.detach().clone(), indices, values), bias)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, values, indices = ctx.saved_tensors
        grad_x = grad_values = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_out @ add_delta_(weight.detach().clone(), indices, values).to(grad_out.dtype)
        if ctx.needs_input_grad[3]:
            grad_values = _value_grads(ctx.impl, x, grad_out, indices, tuple(weight.shape), values.dtype)
        return grad_x, None, None, grad_values, None, None


class _DeltaProductFn(torch.autograd.Function):
    """x @ D^T alone (added to a base layer's own output), D dense or CSR, rebuilt in backward."""

    @staticmethod
    def forward(ctx, x, values, indices, out_features: int, in_features: int, impl: str):
        ctx.save_for_backward(x, values, indices)
        ctx.shape, ctx.impl = (out_features, in_features), impl
        if impl == "dense":
            return F.linear(x, dense_delta(values.to(x.dtype), indices, ctx.shape))
        rows, cols = indices // in_features, indices % in_features
        delta = _csr(values.float(), rows, cols, out_features, in_features)
        with torch.autocast(x.device.type, enabled=False):
            y = (delta @ x.reshape(-1, in_features).float().t()).t()
        return y.reshape(*x.shape[:-1], out_features).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        x, values, indices = ctx.saved_tensors
        (out_features, in_features), impl = ctx.shape, ctx.impl
        grad_x = grad_values = None
        if ctx.needs_input_grad[0] and impl == "dense":
            grad_x = grad_out @ dense_delta(values.to(grad_out.dtype), indices, ctx.shape)
        elif ctx.needs_input_grad[0]:
            # D^T in CSR: the entries re-sorted by column (a sort of k elements).
            rows, cols = indices // in_features, indices % in_features
            by_col = torch.argsort(cols, stable=True)
            delta_t = _csr(values.float()[by_col], cols[by_col], rows[by_col], in_features, out_features)
            with torch.autocast(grad_out.device.type, enabled=False):
                grad_x = (delta_t @ grad_out.reshape(-1, out_features).float().t()).t()
            grad_x = grad_x.reshape(*grad_out.shape[:-1], in_features).to(x.dtype)
        if ctx.needs_input_grad[1]:
            grad_values = _value_grads(impl, x, grad_out, indices, ctx.shape, values.dtype)
        return grad_x, grad_values, None, None, None, None


def merged_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, values: torch.Tensor,
                  indices: torch.Tensor, impl: str = "auto") -> torch.Tensor:
    """x @ (W + D)^T + b in one matmul; W + D rounded once to W's dtype, as a merge would."""
    return _MergedLinearFn.apply(x, weight, bias, values, indices, resolve(impl, x.device.type))


def delta_product(x: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, shape: tuple[int, int],
                  impl: str = "auto") -> torch.Tensor:
    """The delta's contribution x @ D^T alone, for a base layer that cannot take the delta itself."""
    return _DeltaProductFn.apply(x, values, indices, shape[0], shape[1], resolve(impl, x.device.type))
