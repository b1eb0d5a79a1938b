"""LoRA as the recipe runs it: PEFT's layers injected into the loaded model (ZeRO-3 partitions their
factors when the engine is built), nothing before training, a PEFT-format adapter at the end."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from ...config import ConfigError
from ...runtime import zero3
from ...runtime.distributed import per_rank
from ..base import Method, RunContext, write_streamed
from .adapter import LoraAdapterWriter, inject_lora, lora_config


class LoraMethod(Method):
    name = "lora"

    def plan(self, model_config, skeleton, target_shapes, ds_config, world_size, bf16, accelerator) -> None:
        others = [name for name in target_shapes if not isinstance(skeleton.get_submodule(name), nn.Linear)]
        if others:
            raise ConfigError(f"--peft {self.name} trains linear layers only, and --target_modules picks "
                              f"{others[0]}: leave embeddings and other layers out, or use --peft speft")
        self.target_shapes = target_shapes
        self.peft_config = lora_config(self.config, list(target_shapes), [n for n, _ in skeleton.named_modules()])

    @classmethod
    def randomness_per_micro_batch(cls, config) -> list[str]:
        return [f"--lora_dropout {config.lora_dropout}"] if config.lora_dropout > 0 else []

    def describe(self) -> str:
        return (f"{self.name}: rank {self.config.lora_r} on {len(self.target_shapes)} weights, "
                f"{self.dense_count():,} trainable")

    def dense_count(self) -> int:
        return self.config.lora_r * sum(rows + cols for rows, cols in self.target_shapes.values())

    def inject(self, model, ctx: RunContext) -> list:
        dtype = next(p for p in model.parameters()).dtype
        self.factors = inject_lora(model, self.peft_config, dtype)
        self.lora_layers = [model.get_submodule(name) for name in self.factors]
        return [p for pair in self.factors.values() for p in pair]

    def restore(self, model, ctx: RunContext, point) -> list:
        return self.inject(model, ctx)  # the checkpoint's slices hold the factors

    @contextmanager
    def without_update(self):
        # PEFT's own switch (what PeftModel.disable_adapter uses); enabling again makes the factors trainable
        for layer in self.lora_layers:
            layer.enable_adapters(False)
        try:
            yield
        finally:
            for layer in self.lora_layers:
                layer.enable_adapters(True)

    def trainable_record(self, engine) -> dict:
        params = [p for pair in self.factors.values() for p in pair]
        held = per_rank([sum(zero3.resident_bytes(p) for p in params)])
        return {"event": "trainable", "method": self.name, "trainable": sum(zero3.full_numel(p) for p in params),
                "bytes_per_rank": [int(r[0]) for r in held]}

    def side_record(self, nonzeros: int) -> dict:
        """What our side file says beside PEFT's config (`nonzeros`: the saved factors' non-zero entries)."""
        return {"method": self.name, "trainable": self.dense_count()}

    def save_adapter(self, engine, ctx: RunContext, path: Path) -> None:
        """Gather one module's (A, B) at a time (collectives on every rank) and let rank 0 write them at their
        place in PEFT's weights file before the next: no rank holds more than one module's factors."""
        config, plan = self.config, ctx.plan
        nonzeros = [0]

        def modules():
            for module, (a, b) in self.factors.items():
                whole = zero3.gather_full_fp32(a), zero3.gather_full_fp32(b)
                nonzeros[0] += sum(int(torch.count_nonzero(t)) for t in whole)
                yield module, *whole
                del whole  # before the next module's are gathered

        def finish(writer) -> None:
            side = {**self.side_record(nonzeros[0]), "base_model_name_or_path": config.model,
                    "base_config_hash": plan.base_config_hash,
                    "shapes": {name: list(shape) for name, shape in self.target_shapes.items()},
                    "train_config": asdict(config)}
            self.peft_config.base_model_name_or_path = config.model
            writer.finish(self.peft_config, side)

        shapes = {module: (list(zero3.full_shape(a)), list(zero3.full_shape(b)))
                  for module, (a, b) in self.factors.items()}
        write_streamed(ctx.rank, path, lambda: LoraAdapterWriter(path, shapes), modules(), finish)
