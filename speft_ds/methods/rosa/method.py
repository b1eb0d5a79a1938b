"""RoSA as the recipe runs it: LoRA alone for the first --rosa_start of the steps; then a salience pass on the
model as it then is (LoRA included) scores the frozen base weights, each weight matrix takes its share of k
(largest remainder, as --selection local), sparse-delta layers are put under the LoRA layers, and both train
together to the end: the LoRA factors keep their values and AdamW moments across the switch, the deltas
start from zero. The mask stays fixed after that (the paper's static mask).

The two parts are a LoraMethod and a SpeftMethod whose targets are the LoRA layers' base layers
(`NAME.base_layer`); this class only sequences them."""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from dataclasses import replace
from pathlib import Path

import deepspeed

from ...config import ConfigError
from ...runtime import zero3
from ...runtime.ds_config import salience_ds_config
from ..base import Method, RunContext
from ..lora.method import LoraMethod
from ..speft.method import SpeftMethod
from .adapter import BASE, save_parts


class RosaMethod(Method):
    name = "rosa"

    def __init__(self, config):
        super().__init__(config)
        self.lora = LoraMethod(config)
        # the sparse part: a share of k in every weight, as --selection local
        self.sparse = SpeftMethod(replace(config, selection="local"))
        self.sparse.layers = {}

    def plan(self, model_config, skeleton, target_shapes, ds_config, world_size, bf16, accelerator) -> None:
        self.lora.plan(model_config, skeleton, target_shapes, ds_config, world_size, bf16, accelerator)
        self.sparse.plan(model_config, skeleton, {f"{name}{BASE}": shape for name, shape in target_shapes.items()},
                         ds_config, world_size, bf16, accelerator)

    @classmethod
    def randomness_per_micro_batch(cls, config) -> list[str]:
        return LoraMethod.randomness_per_micro_batch(config)

    def describe(self) -> str:
        return (f"rosa: LoRA rank {self.config.lora_r} ({self.lora.dense_count():,}) alone for the first "
                f"{self.config.rosa_start:.0%} of the steps, then with {self.sparse.k:,} sparse entries chosen per "
                f"weight by --metric {self.config.metric}; {self.sparse.describe()}")

    def _switch_step(self, total_steps: int) -> int:
        return max(1, round(self.config.rosa_start * total_steps))

    def check_run_length(self, total_steps: int) -> None:
        switch = self._switch_step(total_steps)
        if switch >= total_steps:
            raise ConfigError(f"--peft rosa switches to LoRA + sparse deltas after step {switch} of a "
                              f"{total_steps}-step run, so the sparse part would never train: lower --rosa_start or "
                              "train longer")

    @property
    def salience(self):
        """The sparse part's salience plan (groups, offload), as SPEFT's (the dry run reads it)."""
        return getattr(self.sparse, "salience", None)

    def inject(self, model, ctx: RunContext) -> list:
        self.update_every_steps = self._switch_step(ctx.plan.total_steps)
        return self.lora.inject(model, ctx)

    def restore(self, model, ctx: RunContext, point) -> list:
        self.update_every_steps = self._switch_step(ctx.plan.total_steps)
        params = self.lora.restore(model, ctx, point)
        if point.meta["phase"] == "sparse":
            params += self.sparse.restore(model, ctx, point)
        return params

    # --- the switch from LoRA alone to LoRA with the sparse part
    @property
    def update_every(self) -> int:
        return getattr(self, "update_every_steps", 0)

    def update(self, engine, model, ctx: RunContext, update: int, completed_steps: int, make_engine):
        """At the end of the warm-up (the first update; later ones do nothing): the salience pass and the
        selection on the base weights, then a new engine over the LoRA factors and the new deltas."""
        if self.sparse.layers:
            return engine
        factors = self.lora_params()
        kept = {p: zero3.local_trained_slices(p) for p in factors}  # each rank its own slices, nothing whole
        step = zero3.adam_step(engine)
        zero3.destroy_engine(engine)
        for p in factors:  # frozen while the base weights are scored: no gradient is formed for them
            p.requires_grad_(False)
        scoring = deepspeed.initialize(model=model, config=salience_ds_config(ctx.plan.ds_config))[0]
        selected, self.sparse.summary = self.sparse.select_masks(scoring, ctx)
        zero3.destroy_engine(scoring)
        for p in factors:
            p.requires_grad_(True)
        self.sparse.base_weights = {name: layer.weight for name, layer in self.sparse._targets(model).items()}
        self.sparse.layers = self.sparse.inject_selected(model, ctx, selected)
        engine = make_engine(factors + self.sparse.values(), completed_steps)
        zero3.carry_trained_slices(engine, step, kept)
        ctx.log.write({"event": "rosa_switch", "step": completed_steps, "k": self.sparse.delta_count()})
        ctx.log.write(self.trainable_record(engine))
        return engine

    def lora_params(self) -> list:
        return [p for pair in self.lora.factors.values() for p in pair]

    def values(self) -> list:
        return self.lora_params() + (self.sparse.values() if self.sparse.layers else [])

    @contextmanager
    def without_update(self):
        with ExitStack() as stack:
            stack.enter_context(self.lora.without_update())
            if self.sparse.layers:
                stack.enter_context(self.sparse.without_update())
            yield

    def trainable_record(self, engine) -> dict:
        record = self.lora.trainable_record(engine)
        k = self.sparse.delta_count() if self.sparse.layers else 0
        return {**record, "method": self.name, "lora_trainable": record["trainable"], "sparse_k": k,
                "trainable": record["trainable"] + k}

    # --- checkpoints and the adapter
    def checkpoint_state(self, engine) -> tuple[dict, dict]:
        if not self.sparse.layers:
            return {}, {"phase": "lora"}
        state, meta = self.sparse.checkpoint_state(engine)
        return state, {**meta, "phase": "sparse"}

    def checkpoint_slices(self) -> dict:
        return self.sparse.checkpoint_slices() if self.sparse.layers else {}

    def save_adapter(self, engine, ctx: RunContext, path: Path) -> None:
        save_parts(ctx.rank, path, lambda lora_path: self.lora.save_adapter(engine, ctx, lora_path),
                   lambda sparse_path: self.sparse.save_adapter(engine, ctx, sparse_path,
                                                                saved_name=lambda name: name.removesuffix(BASE)),
                   {"base_config_hash": ctx.plan.base_config_hash, "rosa_start": self.config.rosa_start,
                    "lora_trainable": self.lora.dense_count(), "sparse_k": self.sparse.delta_count()})

