"""RoSA's adapter: OUTPUT_DIR/adapter/ holds lora/ (PEFT's LoRA format, as --peft lora writes it) and sparse/
(SPEFT's format, its modules named as the base model names its linears), and adapter_config.json saying so.
The total update is W + D + scaling x B A: merging adds the sparse part, then the LoRA part; unmerged, the
sparse deltas sit under PEFT's LoRA layers (their base layers)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

from torch import nn

from ..adapter_files import CONFIG_NAME, publish_directory, staging_directory, versions

PARTS = ("lora", "sparse")
PEFT_TYPE = ("ROSA: a speft-ds adapter (LoRA in lora/, sparse deltas in sparse/), which PEFT cannot load: load it "
             "with speft_ds.load_adapter(model, path), or merge it into the base with speft-merge")
PEFT_PREFIX = "base_model.model."  # where PeftModel puts the model's own module names
BASE = ".base_layer"  # PEFT's name for the linear a LoRA layer wraps


def save_parts(rank: int, path: Path, save_lora: Callable[[Path], None], save_sparse: Callable[[Path], None],
               meta: dict) -> None:
    """Both parts into a new directory beside `path` (each written as its method writes it: collectives on
    every rank, files on rank 0), then adapter_config.json, then the directory renamed into place."""
    staging = staging_directory(path) if rank == 0 else path  # the other ranks write nothing
    try:
        save_lora(staging / "lora")
        save_sparse(staging / "sparse")
        if rank == 0:
            config = {"peft_type": PEFT_TYPE, "parts": list(PARTS), **meta, "versions": versions()}
            (staging / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
            publish_directory(staging, path)
    except BaseException:
        if rank == 0:
            shutil.rmtree(staging, ignore_errors=True)
        raise


def under_lora(indices: dict, values: dict, prefix: str = "") -> tuple[dict, dict]:
    """A sparse part's deltas named for the base layers PEFT's LoRA layers wrap (`prefix`: PeftModel's)."""
    return ({f"{prefix}{name}{BASE}": t for name, t in indices.items()},
            {f"{prefix}{name}{BASE}": t for name, t in values.items()})


def load(model: nn.Module, path: Path) -> nn.Module:
    """Unmerged: PEFT's LoRA layers first (PeftModel.from_pretrained on lora/), then the sparse deltas under
    them."""
    from peft import PeftModel

    from ..adapter_files import check_base, module_weight_shape
    from ..lora.adapter import LoraAdapter
    from ..speft.adapter_format import inject_sparse_deltas, read_adapter

    indices, values, sparse_config = read_adapter(path / "sparse")
    check_base(getattr(model, "config", None), lambda name: module_weight_shape(model, name), sparse_config)
    LoraAdapter(path / "lora").check_base(getattr(model, "config", None),
                                          lambda name: module_weight_shape(model, name))
    model = PeftModel.from_pretrained(model, str(path / "lora"))
    inject_sparse_deltas(model, *under_lora(indices, values, PEFT_PREFIX))
    return model
