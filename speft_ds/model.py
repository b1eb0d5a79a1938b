"""Model loading (HF, under ZeRO-3 so no rank holds the whole model) and target-module resolution."""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers.integrations import HfDeepSpeedConfig

from .config import ConfigError, TrainConfig, target_pattern


def load_model_config(config: TrainConfig):
    try:
        return AutoConfig.from_pretrained(config.model, trust_remote_code=config.trust_remote_code)
    except (OSError, ValueError) as err:
        raise ConfigError(f"--model {config.model} has an unreadable config ({err}): pass a HF model directory") from None


def load_tokenizer(config: TrainConfig):
    try:
        return AutoTokenizer.from_pretrained(config.model, trust_remote_code=config.trust_remote_code)
    except (OSError, ValueError) as err:
        raise ConfigError(f"--model {config.model} has no usable tokenizer ({err}): add tokenizer files") from None


def skeleton_model(model_config, trust_remote_code: bool = False) -> nn.Module:
    """The model's module tree on the meta device: names and shapes, no memory, no weights read."""
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(model_config, trust_remote_code=trust_remote_code)


SUPPORTED_TARGETS = (nn.Linear, nn.Embedding)


def find_targets(model: nn.Module, spec: str | None) -> dict[str, nn.Module]:
    """Targeted layers by name, in `named_modules()` order.

    Default: every Linear inside the decoder blocks (the model's ModuleLists). Named targets may be any
    linear or embedding layer, lm_head and embed_tokens included.
    """
    if spec is None:
        blocks = tuple(f"{name}." for name, module in model.named_modules() if isinstance(module, nn.ModuleList))
        targets = {name: module for name, module in model.named_modules()
                   if isinstance(module, nn.Linear) and name.startswith(blocks)}
        if not targets:
            raise ConfigError("the model has no linear layer inside decoder blocks: name targets with --target_modules")
        return targets
    pattern = target_pattern(spec)
    matched = {name: module for name, module in model.named_modules() if pattern.fullmatch(name)}
    unsupported = [name for name, module in matched.items() if not isinstance(module, SUPPORTED_TARGETS)]
    if unsupported:
        raise ConfigError(f"--target_modules matches modules that are neither linear nor embedding layers "
                          f"({', '.join(unsupported[:3])}): name those layers only")
    if not matched:
        raise ConfigError(f"--target_modules '{spec}' matches no layer of the model: use names such as "
                          "q_proj,v_proj or a regex over full module names")
    return matched


def load_model(config: TrainConfig, ds_config: dict, dtype: torch.dtype) -> tuple[nn.Module, HfDeepSpeedConfig]:
    """Load under ZeRO-3: each rank reads and keeps only its own partition of every weight.

    The returned HfDeepSpeedConfig must stay alive while the model is used: transformers looks it up
    through a weak reference to know that ZeRO-3 is on.
    """
    hf_ds_config = HfDeepSpeedConfig(ds_config)
    model = AutoModelForCausalLM.from_pretrained(config.model, dtype=dtype, use_safetensors=True,
                                                 trust_remote_code=config.trust_remote_code)
    model.requires_grad_(False)
    return model, hf_ds_config
