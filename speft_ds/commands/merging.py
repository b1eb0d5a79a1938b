"""Fold an adapter into its base model's safetensors checkpoint and write a new HF model directory.

Streams, for models too big to load: the base shards are read one layer at a time, each targeted weight
gets its delta added in fp32, and finished tensors fill an output shard that is written once full. At any
moment the merge holds one layer's tensors (dequantized where the base is bitsandbytes-quantized) on top
of the output shard being filled. A quantized base is written in bf16, without its quantization config.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from itertools import groupby
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..config import ConfigError
from ..methods.adapters import read_deltas
from ..models import bnb_weights
from ..models.published import readable_by_all

WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack")
_ITEM_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def _base_files(base_dir: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it, in the checkpoint's order."""
    if (base_dir / INDEX).is_file():
        weight_map = json.loads((base_dir / INDEX).read_text())["weight_map"]
        return {name: base_dir / file for name, file in sorted(weight_map.items(), key=lambda kv: (kv[1], kv[0]))}
    if (base_dir / WEIGHTS).is_file():
        with safe_open(str(base_dir / WEIGHTS), framework="pt") as handle:
            return {name: base_dir / WEIGHTS for name in handle.keys()}
    raise ConfigError(f"--model {base_dir} has no safetensors weights ({WEIGHTS} or {INDEX}): save it with "
                      "save_pretrained(safe_serialization=True) first")


def _layer(name: str) -> str:
    """Tensors of one decoder layer share a key; others (embeddings, final norm, head) stand alone."""
    match = re.match(r"(.*\.layers\.\d+)\.", name)
    return match.group(1) if match else name


class _Base:
    """The base checkpoint's tensors: names, files, output shapes and byte sizes, and how to read them."""

    def __init__(self, base_dir: Path, dtype: torch.dtype | None):
        self.files = _base_files(base_dir)
        self.quantized = bnb_weights.quantized_weights(self.files)
        auxiliary = {name for aux in self.quantized.values() for name in aux}
        self.names = [name for name in self.files if name not in auxiliary]  # what the output holds
        # Floating tensors are written in `dtype`; by default as stored, or bf16 for a quantized base.
        self.dtype = dtype or (torch.bfloat16 if self.quantized else None)
        self.shapes, self.nbytes = {}, {}
        for file, names in groupby(self.names, key=self.files.get):
            with safe_open(str(file), framework="pt") as handle:
                for name in names:
                    stored = handle.get_slice(name)
                    blob = bnb_weights.quant_state_key(self.quantized.get(name, []))
                    self.shapes[name] = (bnb_weights.dense_shape(self._get(handle, file, blob)) if blob
                                         else torch.Size(stored.get_shape()))
                    floating = name in self.quantized or stored.get_dtype() in ("F64", "F32", "F16", "BF16")
                    item = self.dtype.itemsize if floating and self.dtype else _ITEM_BYTES[stored.get_dtype()]
                    self.nbytes[name] = self.shapes[name].numel() * item

    def _get(self, handle, file: Path, name: str) -> torch.Tensor:
        """A tensor through the open handle, or from its own file (a shard boundary may separate a
        quantized weight from its auxiliary tensors)."""
        if self.files[name] == file:
            return handle.get_tensor(name)
        with safe_open(str(self.files[name]), framework="pt") as other:
            return other.get_tensor(name)

    def read(self, handle, file: Path, name: str) -> torch.Tensor:
        """The tensor as the model computes with it: dequantized (fp32) where quantized."""
        if name not in self.quantized:
            return handle.get_tensor(name)
        aux = {a: self._get(handle, file, a) for a in self.quantized[name]}
        return bnb_weights.dequantize(name, handle.get_tensor(name), aux)

    def output_dtype(self, tensor: torch.Tensor) -> torch.dtype:
        return self.dtype if self.dtype and tensor.is_floating_point() else tensor.dtype


def plan_shards(names: list[str], nbytes: dict[str, int], max_shard_bytes: int) -> list[list[str]]:
    """Consecutive tensors packed into shards of at most max_shard_bytes (a bigger tensor gets its own)."""
    shards, size = [[]], 0
    for name in names:
        if shards[-1] and size + nbytes[name] > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes[name]
    return shards


def shard_file_name(i: int, count: int) -> str:
    return WEIGHTS if count == 1 else f"model-{i + 1:05d}-of-{count:05d}.safetensors"


def _copy_side_files(base_dir: Path, out: Path, dtype: torch.dtype | None) -> None:
    """Config, generation config and tokenizer files; the config names the written dtype and loses any
    quantization."""
    for path in base_dir.iterdir():
        if path.is_file() and not path.name.endswith(_WEIGHT_SUFFIXES) and path.name != INDEX:
            shutil.copy2(path, out / path.name)
    config = json.loads((out / "config.json").read_text())
    config.pop("quantization_config", None)
    if dtype is not None:
        name = str(dtype).removeprefix("torch.")
        config.update({key: name for key in ("dtype", "torch_dtype") if key in config} or {"dtype": name})
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def merge_checkpoint(base_dir: str | Path, adapter_dir: str | Path, out: str | Path, max_shard_bytes: int,
                     dtype: torch.dtype | None = None, trust_remote_code: bool = False) -> list[str]:
    """Write base + adapter to `out` (a new directory, created atomically), floating tensors in `dtype`
    (default: as stored; bf16 for a quantized base). Returns the shard file names."""
    from transformers import AutoConfig

    base_dir, out = Path(base_dir), Path(out)
    adapter = read_deltas(adapter_dir)
    base = _Base(base_dir, dtype)
    model_config = AutoConfig.from_pretrained(base_dir, trust_remote_code=trust_remote_code)
    adapter.check_base(model_config, lambda name: base.shapes.get(f"{name}.weight"))

    shards = plan_shards(base.names, base.nbytes, max_shard_bytes)
    shard_of = {name: i for i, names in enumerate(shards) for name in names}
    files = [shard_file_name(i, len(shards)) for i in range(len(shards))]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        pending: dict[str, torch.Tensor] = {}
        for (file, _), names in groupby(base.names, key=lambda name: (base.files[name], _layer(name))):
            with safe_open(str(file), framework="pt") as handle:  # mapped for this layer only
                for name in names:
                    tensor = base.read(handle, file, name)
                    dtype = base.output_dtype(tensor)
                    module = name.removesuffix(".weight")
                    if name.endswith(".weight") and module in adapter.modules:  # summed in fp32, rounded once
                        tensor = adapter.add_to(module, tensor.float())
                    pending[name] = tensor.to(dtype).contiguous()
                    if name == shards[shard_of[name]][-1]:  # the shard is complete: write it, free it
                        save_file(pending, str(tmp / files[shard_of[name]]), metadata={"format": "pt"})
                        pending = {}
        if len(shards) > 1:
            weight_map = {name: files[shard_of[name]] for name in base.names}
            index = {"metadata": {"total_size": sum(base.nbytes.values())}, "weight_map": weight_map}
            (tmp / INDEX).write_text(json.dumps(index, indent=2) + "\n")
        _copy_side_files(base_dir, tmp, base.dtype)
        readable_by_all(tmp)  # a serving container under another user must read it
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return files
