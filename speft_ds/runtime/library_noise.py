"""Library messages that say nothing a user of this tool can act on, silenced once at import."""

from __future__ import annotations

import logging
import warnings


class _DropMessages(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def silence_library_noise() -> None:
    # torch 2.13 deprecates the tensor collectives that DeepSpeed's ZeRO-3 calls on every gather and
    # reduce-scatter (our own code calls their replacements where they exist).
    warnings.filterwarnings("ignore", category=FutureWarning,
                            message=r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated")
    # peft (0.21) reads transformers' deprecated `is_gradient_checkpointing` when it wraps a model.
    warnings.filterwarnings("ignore", category=FutureWarning, message=r"`is_gradient_checkpointing` is deprecated")
    # bitsandbytes on an AVX512-BF16 CPU asks for the `kernels` package, which fetches a kernel from the HF
    # hub; without it bitsandbytes uses its own CPU kernel, which is what runs here.
    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
        _DropMessages("Failed to load CPU gemm_4bit_forward from kernels-community"))
