"""Sparse-delta layers: a frozen linear or embedding layer plus trainable values at fixed flat indices.

Effective weight: W + scatter(indices, values). A linear layer computes it in one matmul with W + D built
per call (or, where W is quantized, as the base layer's output plus the delta's product); either way
autograd keeps no weight-sized copy for the backward pass (delta_impls.py has the arithmetic).
Under ZeRO-3 the recipe registers the base weight with the delta layer, which reads it directly
(zero3.use_in_forward).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...config import ConfigError
from ...models.bnb_weights import is_quantized
from .delta_impls import add_delta_, delta_product, dense_delta, linear_weight_grad, merged_linear


def index_dtype(numel: int) -> torch.dtype:
    """The smallest integer type that holds every flat index of a weight with `numel` elements."""
    return torch.int32 if numel < 2**31 else torch.int64


def embedding_weight_grad(ids: torch.Tensor, grad_out: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """dL/dW of y = W[ids]: each looked-up row receives its output gradient."""
    return grad_out.new_zeros(shape).index_add_(0, ids.reshape(-1), grad_out.reshape(-1, shape[1]))


def weight_grad_fn(module: nn.Module):
    """The dense weight gradient formula for a supported layer type (from its input and output gradient)."""
    return embedding_weight_grad if isinstance(module, nn.Embedding) else linear_weight_grad


class _SparseDeltaEmbeddingFn(torch.autograd.Function):
    """dense(delta)[ids]; the backward forms a per-layer dW transient and reads it at the indices."""

    @staticmethod
    def forward(ctx, ids, values, indices, num_embeddings: int, embedding_dim: int):
        ctx.save_for_backward(ids, values, indices)
        ctx.shape = (num_embeddings, embedding_dim)
        return F.embedding(ids, dense_delta(values, indices, ctx.shape))

    @staticmethod
    def backward(ctx, grad_out):
        ids, values, indices = ctx.saved_tensors
        grad_w = embedding_weight_grad(ids, grad_out, ctx.shape)
        return None, grad_w.view(-1)[indices].to(values.dtype), None, None, None


class _SparseDeltaLayer(nn.Module):
    """A frozen base layer whose `delta_values` at `delta_indices` are the only trainable parameters.

    The indices are a frozen parameter rather than a buffer so that, created under zero.Init, they are
    partitioned beside the values and gathered with them around each forward and backward: a rank keeps
    about 1/N of them (int32 where they fit) instead of every layer's whole list.

    With `scales` (frozen, partitioned the same way) the delta is scales x values: the trained parameter is
    then a reparametrisation whose Adam steps move each entry by about lr x its scale."""

    def __init__(self, base_layer: nn.Module, indices: torch.Tensor, values: torch.Tensor | None,
                 shape: tuple[int, int], scales: torch.Tensor | None = None):
        super().__init__()
        self.base_layer = base_layer.requires_grad_(False)
        self.shape = shape
        self.delta_indices = nn.Parameter(indices.to(index_dtype(shape[0] * shape[1])), requires_grad=False)
        if values is None:
            values = torch.zeros(indices.numel(), dtype=torch.float32)
        self.delta_values = nn.Parameter(values.detach().clone())
        self.delta_scales = None if scales is None else nn.Parameter(scales.to(torch.float32), requires_grad=False)
        # False: the layer computes as its base does (the base model's outputs, for --retention_text's KL)
        self.delta_enabled = True

    def delta(self) -> torch.Tensor:
        """The delta's entries at delta_indices (values, times their scales where there are any)."""
        return self.delta_values if self.delta_scales is None else self.delta_values * self.delta_scales

    @property
    def weight(self) -> nn.Parameter:
        """The frozen base weight, for code that reads `layer.weight` (dtype, device, tying)."""
        return self.base_layer.weight

    def get_delta_weight(self) -> torch.Tensor:
        return dense_delta(self.delta().detach(), self.delta_indices, self.shape)

    @torch.no_grad()
    def merge(self) -> nn.Module:
        """Fold the delta into the base weight and return the plain base layer."""
        if is_quantized(self.base_layer.weight):
            raise ConfigError("cannot merge into quantized weights in place (that would re-quantize them): write a "
                              "dequantized merged model with launch/merge.py")
        add_delta_(self.base_layer.weight, self.delta_indices, self.delta().detach())
        return self.base_layer


class SparseDeltaLinear(_SparseDeltaLayer):
    """`impl` chooses how the delta's product is computed (delta_impls.py: auto, dense, sparse)."""

    def __init__(self, base_layer: nn.Module, indices: torch.Tensor, values: torch.Tensor | None = None,
                 impl: str = "auto", scales: torch.Tensor | None = None):
        super().__init__(base_layer, indices, values, (base_layer.out_features, base_layer.in_features), scales)
        self.impl = impl

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.base_layer.weight
        if not self.delta_enabled:  # the weight this layer reads itself under ZeRO-3, not the base layer's call
            return self.base_layer(x) if is_quantized(weight) else F.linear(x, weight, self.base_layer.bias)
        # A quantized weight cannot take the delta in its own dtype; a frozen delta (scored as part of the
        # base by drop_regrow's salience pass) keeps the base layer's own call, where the salience hooks sit.
        if is_quantized(weight) or not self.delta_values.requires_grad:
            return self.base_layer(x) + delta_product(x, self.delta(), self.delta_indices, self.shape, self.impl)
        return merged_linear(x, weight, self.base_layer.bias, self.delta(), self.delta_indices, self.impl)


class SparseDeltaEmbedding(_SparseDeltaLayer):
    def __init__(self, base_layer: nn.Embedding, indices: torch.Tensor, values: torch.Tensor | None = None):
        super().__init__(base_layer, indices, values, (base_layer.num_embeddings, base_layer.embedding_dim))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if not self.delta_enabled:
            return self.base_layer(ids)
        delta = _SparseDeltaEmbeddingFn.apply(ids, self.delta_values, self.delta_indices, *self.shape)
        return self.base_layer(ids) + delta.to(self.base_layer.weight.dtype)


def sparse_delta_layer(base_layer: nn.Module, indices: torch.Tensor, values: torch.Tensor | None = None,
                       impl: str = "auto", scales: torch.Tensor | None = None) -> _SparseDeltaLayer:
    """Wrap a linear or embedding layer in its sparse-delta layer (`impl`: how a linear's delta product is
    computed; an embedding's lookup has one way; `scales`: a linear's per-entry reparametrisation)."""
    if isinstance(base_layer, nn.Embedding):
        if scales is not None:
            raise ConfigError("--delta_scaling input_channel scales a linear layer's input channels; an embedding "
                              "has none: drop the embedding from --target_modules")
        return SparseDeltaEmbedding(base_layer, indices, values)
    return SparseDeltaLinear(base_layer, indices, values, impl, scales)
