"""bitsandbytes-quantized weights as transformers stores them in safetensors, read back as dense tensors.

4-bit (nf4/fp4): NAME.weight holds packed uint8 codes, beside NAME.weight.absmax, .quant_map, optional
.nested_* tensors and NAME.weight.quant_state.bitsandbytes__{nf4,fp4} (a JSON blob with the shape).
8-bit: NAME.weight is int8 with per-row scales in NAME.SCB (and a NAME.weight_format marker).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

_QUANT_STATE = ".quant_state.bitsandbytes__"


def quantized_weights(names: Iterable[str]) -> dict[str, list[str]]:
    """Each quantized weight's name mapped to the names of the auxiliary tensors stored beside it."""
    names = set(names)
    found = {}
    for name in names:
        if _QUANT_STATE in name:
            weight = name[:name.index(_QUANT_STATE)]
            found[weight] = sorted(n for n in names if n.startswith(weight + "."))
        elif name.endswith(".SCB"):
            module = name[:-len(".SCB")]
            found[f"{module}.weight"] = [n for n in (name, f"{module}.weight_format") if n in names]
    return found


def _quant_state(weight: str, aux: dict[str, torch.Tensor]):
    from bitsandbytes.functional import QuantState

    return QuantState.from_dict({key[len(weight) + 1:]: t for key, t in aux.items()}, device=torch.device("cpu"))


def dense_shape(weight: str, stored: torch.Size, aux: dict[str, torch.Tensor]) -> torch.Size:
    """The weight's shape before quantization (4-bit codes are stored packed)."""
    if any(_QUANT_STATE in key for key in aux):
        return torch.Size(_quant_state(weight, aux).shape)
    return stored


def dequantize(weight: str, stored: torch.Tensor, aux: dict[str, torch.Tensor]) -> torch.Tensor:
    """The dense fp32 weight that the quantized layer computes with."""
    if any(_QUANT_STATE in key for key in aux):
        from bitsandbytes.functional import dequantize_4bit

        return dequantize_4bit(stored, _quant_state(weight, aux)).float()
    scales = aux[weight[:-len("weight")] + "SCB"]
    return stored.float() * (scales.float() / 127.0)[:, None]
