"""The delta's contribution to a linear layer, x @ scatter(indices, values)^T, two ways (--delta_impl).

dense:  build the dense delta and multiply: a weight-sized transient per call, and three matmuls as large
        as the base layer's own (output, input gradient, weight gradient read at the indices). Cheap
        where matmuls are (a GPU's matrix units).
sparse: CSR products for the output and the input gradient, and the value gradients as a sampled
        dense-dense product over the selected entries only (torch.sparse.sampled_addmm). At 1% density
        on one CPU core these cost 1-4 ms against 30 ms for one dense matmul of a 768 x 2048 layer
        (docs/perf_notes.md). CPU sparse kernels have no bf16, so this path computes in fp32.
Neither keeps a weight-sized tensor for the backward pass: each rebuilds what it needs there.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

# Printed once per process by torch, on every rank: CSR is what it says, and tested here.
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")

def resolve(impl: str, device_type: str) -> str:
    """'auto' picks by measurement: sparse on CPU, dense on accelerators."""
    if impl != "auto":
        return impl
    return "sparse" if device_type == "cpu" else "dense"


def dense_delta(values: torch.Tensor, indices: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """scatter(indices, values) as a dense tensor of `shape`."""
    delta = values.new_zeros(shape[0] * shape[1])
    delta[indices] = values
    return delta.view(shape)


def linear_weight_grad(x: torch.Tensor, grad_out: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """dL/dW of y = x W^T: grad_out^T x over all leading dimensions."""
    return grad_out.reshape(-1, shape[0]).t().to(x.dtype) @ x.reshape(-1, shape[1])


class _DenseProductFn(torch.autograd.Function):
    """x @ dense(delta)^T whose backward rebuilds the dense delta instead of saving it."""

    @staticmethod
    def forward(ctx, x, values, indices, out_features: int, in_features: int):
        ctx.save_for_backward(x, values, indices)
        ctx.shape = (out_features, in_features)
        return F.linear(x, dense_delta(values.to(x.dtype), indices, ctx.shape))

    @staticmethod
    def backward(ctx, grad_out):
        x, values, indices = ctx.saved_tensors
        grad_x = grad_values = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_out @ dense_delta(values.to(grad_out.dtype), indices, ctx.shape)
        if ctx.needs_input_grad[1]:
            # A dense per-layer dW transient, read at the selected entries only.
            grad_values = linear_weight_grad(x, grad_out, ctx.shape).view(-1)[indices].to(values.dtype)
        return grad_x, grad_values, None, None, None


def _csr(values: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, n_rows: int, n_cols: int) -> torch.Tensor:
    """A CSR matrix from entries sorted by (row, col)."""
    crow = torch.zeros(n_rows + 1, dtype=cols.dtype, device=cols.device)
    crow[1:] = torch.bincount(rows, minlength=n_rows).cumsum(0)
    return torch.sparse_csr_tensor(crow, cols, values, (n_rows, n_cols), check_invariants=False)


def _rows_cols(indices: torch.Tensor, in_features: int) -> tuple[torch.Tensor, torch.Tensor]:
    return indices // in_features, indices % in_features


class _SparseProductFn(torch.autograd.Function):
    """x @ D^T with D = scatter(indices, values) kept sparse (CSR); value gradients sampled at the indices."""

    @staticmethod
    def forward(ctx, x, values, indices, out_features: int, in_features: int):
        ctx.save_for_backward(x, values, indices)
        ctx.shape = (out_features, in_features)
        rows, cols = _rows_cols(indices, in_features)
        delta = _csr(values.float(), rows, cols, out_features, in_features)
        with torch.autocast(x.device.type, enabled=False):  # the sparse kernels are fp32 only
            y = (delta @ x.reshape(-1, in_features).float().t()).t()
        return y.reshape(*x.shape[:-1], out_features).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        x, values, indices = ctx.saved_tensors
        out_features, in_features = ctx.shape
        rows, cols = _rows_cols(indices, in_features)
        grad = grad_out.reshape(-1, out_features).float()
        grad_x = grad_values = None
        with torch.autocast(grad.device.type, enabled=False):
            if ctx.needs_input_grad[0]:
                # D^T in CSR: the entries re-sorted by column (a sort of k elements).
                by_col = torch.argsort(cols, stable=True)
                delta_t = _csr(values.float()[by_col], cols[by_col], rows[by_col], in_features, out_features)
                grad_x = (delta_t @ grad.t()).t().reshape(*grad_out.shape[:-1], in_features).to(x.dtype)
            if ctx.needs_input_grad[1]:
                # (grad^T x) at the selected entries only; the pattern's own values count times beta = 0.
                pattern = _csr(grad.new_zeros(indices.numel()), rows, cols, out_features, in_features)
                sampled = torch.sparse.sampled_addmm(pattern, grad.t(), x.reshape(-1, in_features).float(), beta=0.0)
                grad_values = sampled.values().to(values.dtype)
        return grad_x, grad_values, None, None, None


_FUNCTIONS = {"dense": _DenseProductFn, "sparse": _SparseProductFn}


def delta_product(x: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, shape: tuple[int, int],
                  impl: str = "auto") -> torch.Tensor:
    """The delta's contribution x @ scatter(indices, values)^T, computed the `impl` way."""
    return _FUNCTIONS[resolve(impl, x.device.type)].apply(x, values, indices, shape[0], shape[1])
