"""bitsandbytes-quantized weights as transformers stores them in safetensors, read back as dense tensors.

4-bit (nf4/fp4): NAME.weight holds packed uint8 codes, beside NAME.weight.absmax, .quant_map, optional
.nested_* tensors and NAME.weight.quant_state.bitsandbytes__{nf4,fp4} (a JSON blob with the shape).
8-bit: NAME.weight is int8 with per-row scales in NAME.SCB (and a NAME.weight_format marker).
"""

from __future__ import annotations

import json
from collections.abc import Iterable

import torch

_QUANT_STATE = ".quant_state.bitsandbytes__"


def is_quantized(weight: torch.Tensor) -> bool:
    """A live bitsandbytes weight (4-bit or int8): its elements are codes, not values."""
    return packed_4bit_shape(weight) is not None or weight.dtype == torch.int8


def packed_4bit_shape(weight: torch.Tensor) -> torch.Size | None:
    """A live 4-bit weight's dense shape (it is stored packed); None for any other weight."""
    quant_state = getattr(weight, "quant_state", None)
    return None if quant_state is None else torch.Size(quant_state.shape)


def quantized_weights(names: Iterable[str]) -> dict[str, list[str]]:
    """Each stored quantized weight's name mapped to the names of the auxiliary tensors beside it."""
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


def quant_state_key(aux: Iterable[str]) -> str | None:
    """The auxiliary tensor holding a 4-bit weight's quant state (JSON bytes), if any."""
    return next((key for key in aux if _QUANT_STATE in key), None)


def dense_shape(quant_state_blob: torch.Tensor) -> torch.Size:
    """A stored 4-bit weight's dense shape, from its quant state's JSON (no bitsandbytes needed)."""
    return torch.Size(json.loads(bytes(quant_state_blob.tolist()).decode())["shape"])


def dequantize(weight: str, stored: torch.Tensor, aux: dict[str, torch.Tensor]) -> torch.Tensor:
    """The dense fp32 weight that the quantized layer computes with."""
    if quant_state_key(aux):
        from bitsandbytes.functional import QuantState, dequantize_4bit

        state = QuantState.from_dict({key[len(weight) + 1:]: t for key, t in aux.items()}, device=torch.device("cpu"))
        return dequantize_4bit(stored, state).float()
    scales = aux[weight[:-len("weight")] + "SCB"]
    return stored.float() * (scales.float() / 127.0)[:, None]
