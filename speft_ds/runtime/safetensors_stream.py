"""A safetensors file written one tensor at a time, so that no more than one tensor's bytes need exist at
once: the header (every tensor's name, dtype and shape) first, then each tensor's bytes at their place as
they come. Byte for byte what safetensors' save_file writes for the same tensors and metadata
(tests/unit/test_safetensors_stream.py). Each tensor's bytes are hashed as they are written, and the file is
fsynced before it is closed."""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

import torch

# safetensors orders a file's tensors by dtype, in this order for these, then by name
_DTYPES = {torch.int64: "I64", torch.float32: "F32", torch.int32: "I32", torch.uint8: "U8"}
_HEADER_ALIGN = 8


class SafetensorsWriter:
    """Open `file` for the tensors of `layout` (key -> (dtype, shape)); `add` each, then `close`."""

    def __init__(self, file: str | Path, layout: dict[str, tuple[torch.dtype, list[int]]], metadata: dict[str, str]):
        order = sorted(layout, key=lambda key: (list(_DTYPES).index(layout[key][0]), key))
        header, self.places, end = {"__metadata__": metadata}, {}, 0
        for key in order:
            dtype, shape = layout[key]
            size = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
            header[key] = {"dtype": _DTYPES[dtype], "shape": list(shape), "data_offsets": [end, end + size]}
            self.places[key] = (dtype, end, end + size)
            end += size
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % _HEADER_ALIGN)
        self.data_start = 8 + len(encoded)
        self.file = open(file, "wb")
        try:
            self.file.write(len(encoded).to_bytes(8, "little") + encoded)
            self.file.truncate(self.data_start + end)
        except BaseException:
            self.file.close()
            raise
        self.hashes: dict[str, str] = {}  # key -> sha256 of its bytes, for a checkpoint's manifest

    def add(self, key: str, tensor: torch.Tensor) -> None:
        dtype, begin, end = self.places[key]
        data = tensor.to(dtype).cpu().contiguous().numpy().tobytes()
        if len(data) != end - begin:
            raise ValueError(f"{key} has {len(data)} bytes where the header planned {end - begin}")
        self.file.seek(self.data_start + begin)
        self.file.write(data)
        self.hashes[key] = hashlib.sha256(data).hexdigest()

    def abandon(self) -> None:
        """Close the file unfinished (its owner removes it)."""
        self.file.close()

    def close(self) -> None:
        """Flush the file to stable storage and close it, once every tensor of the layout is in it."""
        missing = set(self.places) - set(self.hashes)
        if missing:
            raise ValueError(f"the file was closed without {sorted(missing)[0]}")
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
