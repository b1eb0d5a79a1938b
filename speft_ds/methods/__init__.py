"""Fine-tuning methods behind one interface (methods.base.Method), one folder each: speft, roselora, lora, rosa.

The recipe reaches a method only through `get(name)`; the adapter tools (merge, generate, evaluate) reach an
adapter file through `read_adapter`, which tells the formats apart by adapter_config.json's peft_type.

Beside the folders: base.py (the interface), adapters.py (reading, applying and merging either adapter format)
and adapter_files.py (what every method's adapter directory shares: file names, base checks, the rename into
place). This folder and its subfolders may import config/, models/, runtime/ and data/, never commands/ or
the top-level modules (recipe.py, cli.py, train.py).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from ..config import ConfigError

if TYPE_CHECKING:  # the adapter tools import this package without DeepSpeed
    from .base import Method

def get(name: str) -> type["Method"]:
    """The method class for --peft NAME (one of config.TrainConfig's choices, checked there)."""
    # Imported here: a method pulls in DeepSpeed, which the adapter tools (merge, generate) do without.
    if name == "lora":
        from .lora.method import LoraMethod
        return LoraMethod
    if name == "rosa":
        from .rosa.method import RosaMethod
        return RosaMethod
    if name == "roselora":
        from .roselora.method import RoseLoraMethod
        return RoseLoraMethod
    from .speft.method import SpeftMethod
    return SpeftMethod


def adapter_type(path: str | Path) -> str:
    """SPEFT or LORA (RoseLoRA's adapters are LoRA files), from adapter_config.json."""
    config = Path(path) / "adapter_config.json"
    try:
        peft_type = str(json.loads(config.read_text()).get("peft_type")).split(":")[0]  # SPEFT's says more after
    except (OSError, json.JSONDecodeError):
        raise ConfigError(f"{path} is not an adapter directory (no readable adapter_config.json)") from None
    if peft_type not in ("SPEFT", "LORA", "ROSA"):
        raise ConfigError(f"the adapter in {path} is of type {peft_type}: speft-ds reads SPEFT, LORA and ROSA "
                          "adapters")
    return peft_type
