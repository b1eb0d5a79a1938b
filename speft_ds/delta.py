"""The sparse-delta layer: a frozen linear layer plus trainable values at fixed flat indices.

Effective weight: W + scatter(indices, values). The forward is the base layer's own output plus the
delta's product, so the base layer stays whatever it is (a ZeRO-3 partitioned Linear today, a
quantized one later) and autograd keeps no dense copy of the weight for the backward pass.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def dense_delta(values: torch.Tensor, indices: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """scatter(indices, values) as a dense [out, in] tensor."""
    delta = values.new_zeros(shape[0] * shape[1])
    delta[indices] = values
    return delta.view(shape)


class _SparseDeltaProduct(torch.autograd.Function):
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
            out_features, in_features = ctx.shape
            # A dense per-layer dW transient, read at the selected entries only.
            grad_w = grad_out.reshape(-1, out_features).t().to(x.dtype) @ x.reshape(-1, in_features)
            grad_values = grad_w.view(-1)[indices].to(values.dtype)
        return grad_x, grad_values, None, None, None


def sparse_delta_linear(x: torch.Tensor, values: torch.Tensor, indices: torch.Tensor,
                        shape: tuple[int, int]) -> torch.Tensor:
    """The delta's contribution x @ scatter(indices, values)^T: the one place a faster path plugs in."""
    return _SparseDeltaProduct.apply(x, values, indices, shape[0], shape[1])


class SparseDeltaLinear(nn.Module):
    """Wraps a frozen linear layer; `delta_values` are the only trainable parameters."""

    def __init__(self, base_layer: nn.Module, indices: torch.Tensor, values: torch.Tensor | None = None):
        super().__init__()
        self.base_layer = base_layer.requires_grad_(False)
        self.shape = (base_layer.out_features, base_layer.in_features)
        self.register_buffer("delta_indices", indices.to(torch.int64), persistent=False)
        if values is None:
            values = torch.zeros(indices.numel(), dtype=torch.float32)
        self.delta_values = nn.Parameter(values.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x) + sparse_delta_linear(x, self.delta_values, self.delta_indices, self.shape)

    def get_delta_weight(self) -> torch.Tensor:
        return dense_delta(self.delta_values.detach(), self.delta_indices, self.shape)

    @torch.no_grad()
    def merge(self) -> nn.Module:
        """Fold the delta into the base weight and return the plain base layer."""
        weight = self.base_layer.weight
        weight.view(-1).index_add_(0, self.delta_indices, self.delta_values.detach().to(weight.dtype))
        return self.base_layer
