"""LoRA as the recipe runs it: PEFT's layers injected into the loaded model (ZeRO-3 partitions their
factors when the engine is built), nothing before training, a PEFT-format adapter at the end."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

from torch import nn

from ...config import ConfigError
from ...runtime import zero3
from ...runtime.distributed import per_rank
from ..base import Method, RunContext, write_on_rank_zero
from .adapter import inject_lora, lora_config, save_lora_adapter


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

    def gathered_factors(self) -> dict:
        """Every module's whole (A, B), fp32, on every rank (collectives)."""
        return {module: (zero3.gather_full_fp32(a), zero3.gather_full_fp32(b))
                for module, (a, b) in self.factors.items()}

    def side_record(self, factors: dict) -> dict:
        """What our side file says beside PEFT's config."""
        return {"method": self.name, "trainable": self.dense_count()}

    def save_adapter(self, engine, ctx: RunContext, path: Path) -> None:
        factors = self.gathered_factors()
        config, plan = self.config, ctx.plan
        side = {**self.side_record(factors), "base_model_name_or_path": config.model,
                "base_config_hash": plan.base_config_hash,
                "shapes": {name: list(shape) for name, shape in self.target_shapes.items()},
                "train_config": asdict(config)}
        self.peft_config.base_model_name_or_path = config.model
        write_on_rank_zero(ctx.rank, path, lambda: save_lora_adapter(path, factors, self.peft_config, side))
