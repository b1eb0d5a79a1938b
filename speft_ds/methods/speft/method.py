"""SPEFT as the recipe runs it: salience and selection before training, sparse-delta layers partitioned
across ranks, optional mask updates, and the SPEFT adapter (flat indices + values) at the end."""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Iterable

import deepspeed
import torch

from ...data.batches import calibration_indices, pad_token_id, rank_batches
from ...data.retention import read_documents, text_rows
from ...runtime import zero3
from ...runtime.distributed import per_rank, release_freed_memory, sum_over_ranks
from ...runtime.ds_config import salience_ds_config
from ...runtime.checkpoint import slice_of
from ...runtime.metrics_log import log_memory
from ..base import Method, RunContext, write_streamed
from . import masks
from .adapter_format import AdapterWriter
from .channel_cap import column_caps
from .channel_scaling import channel_scales, entry_scales
from .partitioned_deltas import inject_partitioned
from .salience import score_groups
from .shard_grads import input_channel_norms
from .salience_budget import SaliencePlan, plan_salience
from .random_share import joined, random_picks, random_quotas
from .selection import gather_indices, num_to_select, select_from_groups, split_budget


_SCALES = "channel_scales/"  # checkpoint state keys of --delta_scaling's per-channel scales


class SpeftMethod(Method):
    name = "speft"

    def __init__(self, config):
        super().__init__(config)
        self.layers: dict = {}
        self.folded = masks.FoldedDeltas()
        self.summary: dict = {}
        self.channel_scales: dict[str, torch.Tensor] | None = None  # --delta_scaling input_channel's s_j

    # --- before training
    def plan(self, model_config, skeleton, target_shapes, ds_config, world_size, bf16, accelerator) -> None:
        self.target_shapes = target_shapes
        self.targeted = sum(rows * cols for rows, cols in target_shapes.values())
        self.k = num_to_select(self.config.density, self.config.num_trainable, self.targeted)
        self.salience: SaliencePlan = plan_salience(self.config, model_config, skeleton, target_shapes, self.k,
                                                    ds_config, world_size, bf16, accelerator)
        fisher_text = self.config.fisher_text
        self.general_documents = read_documents(fisher_text, "--fisher_text") if fisher_text else None

    def describe(self) -> str:
        return self.salience.describe()

    @property
    def target_names(self) -> list[str]:
        return list(self.target_shapes)

    def prepare(self, model, ctx: RunContext) -> None:
        ctx.log.write(self.salience.record())
        # No optimizer: this engine only gathers the partitioned weights around each layer's forward and backward.
        engine = deepspeed.initialize(model=model, config=salience_ds_config(ctx.plan.ds_config))[0]
        self.selected, self.summary = self.select_masks(engine, ctx)
        if self.config.delta_scaling == "input_channel":
            norms = input_channel_norms(engine.module, self._targets(engine.module), self._calibration_batches(ctx))
            self.channel_scales = channel_scales(norms)
        zero3.destroy_engine(engine)
        release_freed_memory()
        self.report_salience_memory(ctx, log_memory(ctx.log, "salience"))  # and selection

    def inject(self, model, ctx: RunContext) -> list:
        self.base_weights = {name: layer.weight for name, layer in self._targets(model).items()}
        self.layers = self.inject_selected(model, ctx, self.selected)
        del self.selected
        return self.values()

    def restore(self, model, ctx: RunContext, point) -> list:
        scales = {key.removeprefix(_SCALES): t for key, t in point.state.items() if key.startswith(_SCALES)}
        self.channel_scales = scales or None
        self.summary = point.meta["score_summary"]
        self.base_weights = {name: layer.weight for name, layer in self._targets(model).items()}
        self.folded = masks.FoldedDeltas.restore(point, point.meta["folded"], self.base_weights)
        # one layer's whole index list at a time, read from every rank's slices as its layer is built
        indices = ((name, point.read_whole(f"indices/{name}")) for name in point.meta["layer_order"])
        self.layers = self._inject(model, ctx, indices)
        return self.values()

    def select_masks(self, engine, ctx: RunContext, calibration_round: int = 0, k: int | None = None,
                     excluded: dict[str, torch.Tensor] | None = None) -> tuple[dict, dict]:
        """Salience over calibration subset number `calibration_round` (0: the first mask), one group of
        weights at a time as the salience plan says, each group merged into the selection before the next is
        scored. Returns the flat indices selected in this rank's shard of each weight, and a summary of the
        scores. `k` and `excluded` (entries that cannot be selected) serve drop_regrow, whose top-k is global."""
        config = self.config
        batches = self._calibration_batches(ctx, calibration_round)
        local = config.selection == "local" and excluded is None
        normalize = config.selection == "normalized"
        started = time.perf_counter()
        model = engine.module
        targets = self._targets(model)
        k = k or self.k
        quotas = dict(zip(self.target_names, split_budget(k, [rows * cols for rows, cols in self.target_shapes.values()])))
        picks = {}
        if config.random_fraction and excluded is None:
            shares = random_quotas(quotas, config.random_fraction)
            picks = excluded = random_picks(targets, shares, config.seed)
            quotas = {name: quota - shares[name] for name, quota in quotas.items()}
            k -= sum(shares.values())
        groups = score_groups(model, targets, self.salience.groups, batches, config.metric,
                              seed=config.seed, show_progress=ctx.rank == 0, offload=self.salience.offload,
                              release=engine.empty_partition_cache, general_batches=self._general_batches(ctx))
        caps = None
        if config.input_channel_cap is not None:
            caps = column_caps(self.target_shapes, self.k / self.targeted, config.input_channel_cap)
        selected, summary, selecting = select_from_groups(groups, self.target_names, k=None if local else k,
                                                          quotas=quotas if local else None, excluded=excluded,
                                                          normalize=normalize, column_caps=caps)
        selected = joined(picks, selected)
        ctx.log.write({"event": "salience", "metric": config.metric, "examples": self._calibration_count(ctx),
                       "chunks": len(self.salience.groups), "offload": self.salience.offload,
                       "wall_time_s": time.perf_counter() - started - selecting})
        count = int(sum_over_ranks(sum(t.numel() for t in selected.values())))
        ctx.log.write({"event": "selection", "selection": "local" if local else "normalized" if normalize else "global",
                       "input_channel_cap": config.input_channel_cap, "random_fraction": config.random_fraction,
                       "k": count, "wall_time_s": selecting})
        return selected, summary

    def _calibration_count(self, ctx: RunContext) -> int:
        return min(self.config.calibration_examples, len(ctx.plan.train_set))

    def _calibration_batches(self, ctx: RunContext, calibration_round: int = 0) -> list[dict]:
        """This rank's micro-batches of calibration subset number `calibration_round` (0: the first mask's)."""
        config, plan = self.config, ctx.plan
        calibration = calibration_indices(len(plan.train_set), config.calibration_examples,
                                          config.seed + calibration_round)
        return rank_batches(plan.train_set, calibration, ctx.rank, ctx.world_size, config.micro_batch_size,
                            pad_token_id(plan.tokenizer))

    def _general_batches(self, ctx: RunContext) -> list[dict] | None:
        """This rank's micro-batches of --fisher_text (up to --calibration_examples rows of it), or None."""
        if self.general_documents is None:
            return None
        config = self.config
        rows = text_rows(self.general_documents, ctx.plan.tokenizer, config.seq_len)
        return rank_batches(rows, calibration_indices(len(rows), config.calibration_examples, config.seed),
                            ctx.rank, ctx.world_size, config.micro_batch_size, pad_token_id(ctx.plan.tokenizer))

    def report_salience_memory(self, ctx: RunContext, after: dict) -> None:
        """The salience phase's measured peak per rank next to the plan: the accelerator's peak allocation, or
        on CPU the peak RSS over the RSS before the model was loaded (what the planner counts)."""
        measured = after.get("device_peak_mib_per_rank") or [
            peak - before for peak, before in zip(after["peak_rss_mib_per_rank"], ctx.start_memory["rss_mib_per_rank"])]
        gib = [round(m / 1024, 3) for m in measured]
        ctx.log.write({"event": "salience_memory", "planned_peak_gib": round(self.salience.planned_peak / 2**30, 3),
                       "measured_peak_gib_per_rank": gib, "max_memory_gib": round(self.salience.budget / 2**30, 3)})
        if ctx.rank == 0:
            print(f"salience: measured peak {max(gib):.2f} GiB per rank, planned "
                  f"{self.salience.planned_peak / 2**30:.2f} GiB", flush=True)

    # --- the layers
    def _targets(self, model) -> dict:
        """The targeted layers by their original names (the base layer where a sparse-delta layer wraps one)."""
        return {name: getattr(model.get_submodule(name), "base_layer", model.get_submodule(name))
                for name in self.target_names}

    def _inject(self, model, ctx: RunContext, indices: Iterable[tuple[str, torch.Tensor]],
                values: dict | None = None) -> dict:
        """Delta layers partitioned across ranks for (name, whole indices) pairs, a generator if need be."""
        scales = self.channel_scales
        scales_of = None if scales is None else lambda name, idx: entry_scales(scales[name], idx)
        return inject_partitioned(model, ctx.plan.ds_config, indices, values, self.config.delta_impl, scales_of)

    def inject_selected(self, model, ctx: RunContext, selected: dict[str, torch.Tensor]) -> dict:
        """Wrap each weight with selected entries in a delta layer partitioned across ranks: a weight's whole
        index list exists only while its layer is created, never every weight's at once."""
        return self._inject(model, ctx, gather_indices(selected))

    def values(self) -> list:
        return [layer.delta_values for layer in self.layers.values()]

    def without_update(self):
        # Deltas folded into W by mask updates cannot be switched off without moving W back.
        return None if self.folded.parts else self._deltas_off()

    @contextmanager
    def _deltas_off(self):
        for layer in self.layers.values():
            layer.delta_enabled = False
        try:
            yield
        finally:
            for layer in self.layers.values():
                layer.delta_enabled = True

    def delta_count(self) -> int:
        return sum(zero3.full_numel(layer.delta_values) for layer in self.layers.values())

    def trainable_record(self, engine) -> dict:
        """The trainable count, and what each rank keeps of the delta parameters (a collective)."""
        held = per_rank([sum(zero3.resident_bytes(layer.delta_indices) for layer in self.layers.values()),
                         sum(zero3.resident_bytes(layer.delta_values) for layer in self.layers.values())])
        return {"event": "delta", "k": self.delta_count(), "index_bytes_per_rank": [int(r[0]) for r in held],
                "value_bytes_per_rank": [int(r[1]) for r in held]}

    def full_indices(self, engine) -> dict[str, torch.Tensor]:
        """Each delta layer's whole index list (int64), gathered one layer at a time (a collective on every
        rank)."""
        # ZeRO-3 may still be prefetching parameters for the next forward, and a gather of an in-flight
        # parameter fails: settle and release them all first.
        engine.empty_partition_cache()
        return {name: zero3.gather_full(layer.delta_indices).long() for name, layer in self.layers.items()}

    # --- mask updates
    @property
    def update_every(self) -> int:
        return self.config.mask_update_steps

    def update(self, engine, model, ctx: RunContext, update: int, completed_steps: int, make_engine):
        started = time.perf_counter()
        strategy = {"reselect": self.reselect, "drop_regrow": self.drop_regrow}[self.config.mask_update]
        engine = strategy(engine, model, ctx, update, completed_steps, make_engine)
        ctx.log.write({"event": "mask_update", "step": completed_steps, "strategy": self.config.mask_update,
                       "k": self.delta_count(), "wall_time_s": time.perf_counter() - started})
        return engine

    def _salience_engine(self, model, ctx: RunContext):
        return deepspeed.initialize(model=model, config=salience_ds_config(ctx.plan.ds_config))[0]

    def reselect(self, engine, model, ctx: RunContext, update: int, completed_steps: int, make_engine):
        """The paper's dynamic mask: fold every delta into W, select k anew on fresh calibration data, and
        train new zero deltas with a fresh optimizer."""
        indices = self.full_indices(engine)
        values = {name: zero3.gather_full_fp32(layer.delta_values) for name, layer in self.layers.items()}
        zero3.destroy_engine(engine)
        self.folded.fold(self.base_weights, indices, values)
        masks.unwrap(model, self.layers)
        salience_engine = self._salience_engine(model, ctx)
        selected, self.summary = self.select_masks(salience_engine, ctx, calibration_round=update)
        zero3.destroy_engine(salience_engine)
        self.layers = self.inject_selected(model, ctx, selected)
        return make_engine(self.values(), completed_steps)

    def drop_regrow(self, engine, model, ctx: RunContext, update: int, completed_steps: int, make_engine):
        """Fold the regrow_fraction of entries with the smallest |value| into W and regrow as many by salience
        among unselected entries; kept entries keep values and AdamW moments, grown ones start from zero."""
        layers = self.layers
        indices = self.full_indices(engine)
        k = sum(t.numel() for t in indices.values())
        n_swap = max(1, round(self.config.regrow_fraction * k))
        kept_state = {name: {"value": zero3.gather_full_fp32(layer.delta_values), **zero3.adam_moments(layer.delta_values)}
                      for name, layer in layers.items()}
        step = zero3.adam_step(engine)
        zero3.destroy_engine(engine)

        keep = masks.largest_magnitudes({name: s["value"] for name, s in kept_state.items()}, k - n_swap)
        for name in layers:
            dropped = torch.ones(indices[name].numel(), dtype=torch.bool)
            dropped[keep[name]] = False
            self.folded.fold(self.base_weights, {name: indices[name][dropped]}, {name: kept_state[name]["value"][dropped]})
        masks.unwrap(model, layers)
        # A weight with no selected entry gets no delta (ZeRO-3 cannot partition an empty parameter).
        kept = {name: indices[name][keep[name]] for name in layers if keep[name].numel() > 0}
        kept_state = {name: {key: t[keep[name]] for key, t in kept_state[name].items()} for name in kept}

        # Score the model as it now is (W with the dropped entries folded in, plus the kept deltas, frozen).
        layers = self._inject(model, ctx, kept.items(), {name: s["value"] for name, s in kept_state.items()})
        for layer in layers.values():
            layer.delta_values.requires_grad_(False)
        salience_engine = self._salience_engine(model, ctx)
        selected, self.summary = self.select_masks(salience_engine, ctx, calibration_round=update, k=n_swap,
                                                   excluded=kept)
        grown = dict(gather_indices(selected))
        zero3.destroy_engine(salience_engine)
        masks.unwrap(model, layers)

        indices, state = masks.union(self.target_names, kept, grown, kept_state)
        self.layers = self._inject(model, ctx, indices.items(), {name: s["value"] for name, s in state.items()})
        engine = make_engine(self.values(), completed_steps)
        zero3.seed_adam_state(engine, step, {self.layers[name].delta_values: {key: t for key, t in s.items()
                                                                              if key != "value"}
                                             for name, s in state.items()})
        return engine

    # --- checkpoints and the adapter
    def checkpoint_state(self, engine) -> tuple[dict, dict]:
        # safetensors returns keys sorted; the engine's parameter order is this one
        scales = {f"{_SCALES}{name}": t for name, t in (self.channel_scales or {}).items()}
        return scales, {"score_summary": self.summary, "layer_order": list(self.layers),
                        "folded": self.folded.layout()}

    def checkpoint_slices(self) -> dict:
        return {**{f"indices/{name}": slice_of(layer.delta_indices, zero3.local_shard(layer.delta_indices))
                   for name, layer in self.layers.items()}, **self.folded.slices(self.base_weights)}

    def _module_total(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """One module's whole indices and values relative to the original base (what mask updates folded in,
        plus its current deltas): a collective where the module has a delta layer."""
        layer = self.layers.get(name)
        current = ({}, {})
        if layer is not None:
            values = zero3.gather_full_fp32(layer.delta_values)
            if layer.delta_scales is not None:  # the saved values are the delta's own: scales folded in
                values = values * zero3.gather_full(layer.delta_scales).to(values)
            current = ({name: zero3.gather_full(layer.delta_indices).long()}, {name: values})
        indices, values = self.folded.total([name], *current)
        return indices[name], values[name]

    def save_adapter(self, engine, ctx: RunContext, path: Path, saved_name=lambda name: name) -> None:
        """Gather one module's indices and values at a time (collectives on every rank) and let rank 0 write
        them at their place in the adapter file before the next: no rank holds more than one module's, and
        the file is what writing them all at once would give. `saved_name`: the name a module is saved under
        (RoSA's: the base model's, not its place under a LoRA layer)."""
        config, plan = self.config, ctx.plan
        engine.empty_partition_cache()  # settle ZeRO-3's prefetching: a gather of an in-flight parameter fails
        names = [n for n in self.target_names if n in self.layers or self.folded.parts.get(n)]
        # a module's count after folding needs its indices (the union); without mask updates it is the layer's k
        counts = {n: (zero3.full_numel(self.layers[n].delta_values) if not self.folded.parts.get(n)
                      else self._module_total(n)[0].numel()) for n in names}
        meta = {"base_model_name_or_path": config.model, "base_config_hash": plan.base_config_hash,
                "metric": config.metric, "selection": config.selection, "density": sum(counts.values()) / self.targeted,
                "trainable_k": self.delta_count(), "target_modules": config.target_modules or "all-linear",
                "salience_summary": self.summary, "train_config": asdict(config)}
        write_streamed(ctx.rank, path,
                       lambda: AdapterWriter(path, {saved_name(n): c for n, c in counts.items()},
                                             {saved_name(n): list(self.target_shapes[n]) for n in names}),
                       ((saved_name(name), *self._module_total(name)) for name in names),
                       lambda writer: writer.finish(meta))
