"""Model loading (HF, under ZeRO-3 so no rank holds the whole model) and target-module resolution."""

from __future__ import annotations

import importlib.util

import torch
from deepspeed.accelerator import get_accelerator
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers.integrations import HfDeepSpeedConfig

from ..config import ConfigError, TrainConfig, target_pattern
from .quantized_layers import release_gathered_4bit_weights


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


def decoder_blocks(model: nn.Module) -> dict[str, nn.Module]:
    """The decoder blocks (children of the outermost ModuleLists) by name, in model order."""
    lists = [name for name, module in model.named_modules() if isinstance(module, nn.ModuleList)]
    outermost = [name for name in lists if not any(name.startswith(f"{other}.") for other in lists)]
    return {f"{name}.{child}": block for name in outermost
            for child, block in model.get_submodule(name).named_children()}


def block_of(name: str, blocks: dict[str, nn.Module]) -> str | None:
    """The decoder block holding module `name`, if any."""
    return next((block for block in blocks if name.startswith(f"{block}.")), None)


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


def check_backends(config: TrainConfig, device_name: str) -> None:
    """The optional packages and hardware that --quantize and --attn ask for, checked before any loading."""
    if config.quantize and importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(f"--quantize {config.quantize} needs bitsandbytes: pip install 'speft-ds[quant]'")
    if config.attn == "flash_attention_2":
        if importlib.util.find_spec("flash_attn") is None:
            raise ConfigError("--attn flash_attention_2 needs the flash-attn package: pip install flash-attn, "
                              "or use --attn sdpa")
        if device_name == "cpu":
            raise ConfigError("--attn flash_attention_2 runs on GPUs only: use --attn sdpa on CPU")


def _quantization_config(config: TrainConfig, dtype: torch.dtype):
    from transformers import BitsAndBytesConfig

    if config.quantize == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    # Packed 4-bit codes stored in the compute dtype look like ordinary float parameters to ZeRO-3, so it
    # partitions and gathers them as it does the rest of the model.
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=config.quantize, bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=dtype, bnb_4bit_quant_storage=dtype)


def load_model(config: TrainConfig, ds_config: dict, dtype: torch.dtype) -> tuple[nn.Module, HfDeepSpeedConfig]:
    """Load under ZeRO-3: each rank reads and keeps only its own partition of every weight.

    A quantized base cannot be loaded inside zero.Init: transformers quantizes it whole on each rank (in its
    quantized size), and ZeRO-3 partitions it when the engine is built. The returned HfDeepSpeedConfig must
    stay alive while the model is used: transformers looks it up through a weak reference to know that
    ZeRO-3 is on.
    """
    kwargs = dict(dtype=dtype, use_safetensors=True, trust_remote_code=config.trust_remote_code,
                  attn_implementation=config.attn)
    if config.quantize:
        # This rank's device from DeepSpeed's accelerator, as runtime.distributed.device (models/ is below runtime/).
        device = torch.device(get_accelerator().current_device_name())
        model = AutoModelForCausalLM.from_pretrained(config.model, quantization_config=_quantization_config(config, dtype),
                                                     device_map={"": device}, **kwargs)
        hf_ds_config = HfDeepSpeedConfig(ds_config)
        if config.quantize in ("nf4", "fp4"):
            release_gathered_4bit_weights(model.requires_grad_(False))
        for module in model.modules():
            if hasattr(module, "support_avx512bf16_for_cpu"):
                # bitsandbytes repacks a 4-bit weight in place for faster CPU inference; under ZeRO-3 that
                # would rewrite a gathered copy and its quant_state, and it needs out_features % 32 == 0.
                module.support_avx512bf16_for_cpu = False
    else:
        hf_ds_config = HfDeepSpeedConfig(ds_config)
        model = AutoModelForCausalLM.from_pretrained(config.model, **kwargs)
    model.requires_grad_(False)
    if config.gradient_checkpointing:
        # Reentrant: its recompute runs as a forward, where ZeRO-3's hooks gather the partitioned weights
        # (the non-reentrant variant recomputes without them). It needs inputs that require grad, which the
        # frozen embedding's output does not by itself.
        kwargs = {"use_reentrant": True}
        if hasattr(model, "activation_checkpointing_enable"):  # newer transformers, where the old name warns
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        # Newer transformers register this hook themselves for reentrant checkpointing; a second one would
        # be out of reach of disable_input_require_grads, and the salience pass in groups needs to remove it.
        if not getattr(model, "_require_grads_hooks", None):
            model.enable_input_require_grads()
    return model, hf_ds_config
