"""LoRA adapters in HF PEFT's format, so `PeftModel.from_pretrained` loads them unchanged.

OUTPUT_DIR/adapter/: adapter_config.json (a peft LoraConfig, only keys PEFT knows), adapter_model.safetensors
(`base_model.model.MODULE.lora_A.weight`, r x in, and `...lora_B.weight`, out x r, PEFT's key names), and
beside them speft_ds_adapter.json: what this project adds (the method, the base model's config hash and the
targeted weights' shapes, for the checks load and merge make; RoseLoRA's sparsity and non-zero counts).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from ...config import ConfigError
from ..adapter_files import CONFIG_NAME, WEIGHTS_NAME, StreamedAdapter, check_base, versions

SIDE_NAME = "speft_ds_adapter.json"
PEFT_PREFIX = "base_model.model."
ADAPTER_NAME = "default"


def lora_config(config, target_names: list[str], module_names: list[str]):
    """PEFT's LoraConfig for these flags and targets: the targets' last name components where PEFT, which
    matches a list entry against the end of every module name (`module_names`), picks exactly the targets
    with them; else the full names."""
    from peft import LoraConfig

    suffixes = sorted({name.rsplit(".", 1)[-1] for name in target_names})
    picked = {name for name in module_names if any(name == s or name.endswith("." + s) for s in suffixes)}
    targets = suffixes if picked == set(target_names) else list(target_names)
    return LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha or 2 * config.lora_r,
                      lora_dropout=config.lora_dropout, target_modules=targets, bias="none", task_type="CAUSAL_LM")


def inject_lora(model: nn.Module, peft_config, dtype: torch.dtype) -> dict[str, tuple[nn.Parameter, nn.Parameter]]:
    """PEFT's LoRA layers in place of the targeted linears (A random, B zero: the model is unchanged);
    returns each targeted module's (A, B) weights, in model order."""
    from peft import inject_adapter_in_model

    inject_adapter_in_model(peft_config, model, adapter_name=ADAPTER_NAME)
    factors = {}
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and ADAPTER_NAME in module.lora_A:
            a, b = module.lora_A[ADAPTER_NAME].weight, module.lora_B[ADAPTER_NAME].weight
            a.data, b.data = a.data.to(dtype), b.data.to(dtype)
            factors[name] = (a, b)
    return factors


def peft_key(module: str, factor: str) -> str:
    return f"{PEFT_PREFIX}{module}.lora_{factor}.weight"


class LoraAdapterWriter(StreamedAdapter):
    """A LoRA adapter directory in PEFT's format written module by module (StreamedAdapter): each module's
    whole (A, B) as they come; PEFT's config and our side file with `finish`."""

    def __init__(self, path: str | Path, shapes: dict[str, tuple[list[int], list[int]]]):
        super().__init__(path, {peft_key(module, factor): (torch.float32, list(shape))
                                for module, pair in shapes.items() for factor, shape in zip("AB", pair)})

    def add(self, module: str, a: torch.Tensor, b: torch.Tensor) -> None:
        self.add_tensor(peft_key(module, "A"), a)
        self.add_tensor(peft_key(module, "B"), b)

    def finish(self, peft_config, side: dict) -> None:
        def fill(directory: Path) -> None:
            peft_config.save_pretrained(str(directory))
            (directory / SIDE_NAME).write_text(json.dumps({**side, "versions": versions()}, indent=2) + "\n")
        super().finish(fill)


class LoraAdapter:
    """A PEFT-format LoRA adapter read back: its config, our side file (may be empty for an adapter PEFT
    wrote) and each module's (A, B)."""

    def __init__(self, path: str | Path):
        path = Path(path)
        try:
            self.config = json.loads((path / CONFIG_NAME).read_text())
            self.side = json.loads((path / SIDE_NAME).read_text()) if (path / SIDE_NAME).is_file() else {}
            tensors = load_file(str(path / WEIGHTS_NAME))
        except Exception as err:  # json, safetensors, a missing file: the same to the user
            raise ConfigError(f"the adapter in {path} is corrupt or truncated ({type(err).__name__}): "
                              "write it again") from None
        self.path = path
        self.factors = {}
        for key in tensors:
            if key.endswith(".lora_A.weight"):
                module = key.removeprefix(PEFT_PREFIX).removesuffix(".lora_A.weight")
                b = tensors.get(peft_key(module, "B"))
                if b is None or b.shape[1] != tensors[key].shape[0]:
                    raise ConfigError(f"the adapter in {path} is corrupt: {module} has no lora_B of rank "
                                      f"{tensors[key].shape[0]}")
                self.factors[module] = (tensors[key], b)
        r = self.config["r"]
        self.scaling = self.config["lora_alpha"] / (r ** 0.5 if self.config.get("use_rslora") else r)

    def check_base(self, model_config, weight_shape) -> None:
        """Refuse another base (where our side file says which it was)."""
        if self.side:
            check_base(model_config, weight_shape, self.side)

    def delta(self, module: str) -> torch.Tensor:
        """The module's dense update, scaling x B A, in fp32."""
        a, b = self.factors[module]
        return self.scaling * (b.float() @ a.float())

    def load_into(self, model: nn.Module, dtype: torch.dtype) -> None:
        """Inject PEFT's LoRA layers and set their factors (plain tensors: a ZeRO-3 engine built afterwards
        partitions them)."""
        from peft import LoraConfig

        config = LoraConfig.from_pretrained(str(self.path))
        layers = inject_lora(model, config, dtype)
        with torch.no_grad():
            for module, (a, b) in self.factors.items():
                layers[module][0].copy_(a)
                layers[module][1].copy_(b)
