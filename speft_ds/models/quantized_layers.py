"""bitsandbytes 4-bit linear layers whose gathered weights ZeRO-3 can release between forward and backward.

bitsandbytes' MatMul4Bit saves a view of the layer's packed weight for its backward. Under ZeRO-3 that view
is of the gathered copy, so every layer's gathered weight stays alive from its forward to its backward:
each rank holds the whole quantized model during a salience or training step (measured on a 7B nf4 base,
2 CPU ranks: about 3 GB per rank more than the planner's one gathered layer). Here the frozen layer's
output is computed by bitsandbytes without autograd, and the input gradient by a function that saves the
parameter itself: ZeRO-3 releases its storage after the forward and gathers it again for the backward,
where the weight is dequantized once more (as bitsandbytes' own backward does).
"""

from __future__ import annotations

import types

import torch
from torch import nn


class _Frozen4bitLinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, compute):
        ctx.save_for_backward(weight)
        with torch.no_grad():
            return compute(x)

    @staticmethod
    def backward(ctx, grad_out):
        from bitsandbytes.functional import dequantize_4bit

        (weight,) = ctx.saved_tensors
        packed = weight.data.reshape(-1, 1)  # bitsandbytes' canonical packed layout
        return grad_out @ dequantize_4bit(packed, weight.quant_state).to(grad_out.dtype), None, None


def _forward(self, x: torch.Tensor) -> torch.Tensor:
    if not (torch.is_grad_enabled() and x.requires_grad):
        return self._bnb_forward(x)
    return _Frozen4bitLinearFn.apply(x, self.weight, self._bnb_forward)


def release_gathered_4bit_weights(model: nn.Module) -> None:
    """Give every frozen bitsandbytes 4-bit linear layer of `model` the forward above."""
    from bitsandbytes.nn import Linear4bit

    for module in model.modules():
        if isinstance(module, Linear4bit) and not hasattr(module, "_bnb_forward"):
            if module.weight.requires_grad or (module.bias is not None and module.bias.requires_grad):
                raise ValueError("only frozen 4-bit layers can take the memory-saving forward")
            module._bnb_forward = module.forward
            module.forward = types.MethodType(_forward, module)
