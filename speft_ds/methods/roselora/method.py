"""RoseLoRA as the recipe runs it: LoRA's layers, engine and adapter, plus a sensitivity kept per ZeRO-3
slice (after each step's backward) and, from the schedule's start, row/column pruning after each step."""

from __future__ import annotations

import torch

from ...runtime import zero3
from ...runtime.checkpoint import slice_of
from ..base import RunContext
from ..lora.method import LoraMethod
from .pruning import factor_masks, keep_fraction, kept_per_line, smoothed


class RoseLoraMethod(LoraMethod):
    name = "roselora"

    def inject(self, model, ctx: RunContext) -> list:
        self.total_steps = ctx.plan.total_steps
        self.scores: dict[str, torch.Tensor] = {}  # parameter name -> this rank's slice of the sensitivity
        self.restored = None  # a checkpoint's scores, read slice by slice once the factors are partitioned
        return super().inject(model, ctx)

    def restore(self, model, ctx: RunContext, point) -> list:
        params = self.inject(model, ctx)
        self.restored = point
        return params

    def _named_params(self) -> dict[str, torch.nn.Parameter]:
        return {f"{module}.{factor}": p for module, pair in self.factors.items() for factor, p in zip("AB", pair)}

    def keep(self, step: int) -> float:
        c = self.config
        return keep_fraction(step, self.total_steps, c.rose_sparsity, c.rose_start, c.rose_end)

    def after_backward(self, engine, step: int) -> None:
        """Smooth |w x grad| into each slice's score (no communication: it is elementwise)."""
        for name, param in self._named_params().items():
            grad, value = zero3.local_grad_and_value(param)
            previous = self.scores.get(name)
            if previous is None and self.restored is not None:
                previous = self.restored.read_slice(f"scores/{name}", param)
            self.scores[name] = smoothed(previous, (grad * value).abs(), self.config.rose_beta)
        if self.restored is not None:  # every score is read: let go of the checkpoint's files
            self.restored.close()
            self.restored = None

    def whole_scores(self) -> dict[str, torch.Tensor]:
        """Every factor's whole score, shaped like it, on every rank (one collective)."""
        named = self._named_params()
        whole = zero3.gather_from_shards(list(named.values()), [self.scores[name] for name in named])
        return {name: w.view(zero3.full_shape(p)) for (name, p), w in zip(named.items(), whole)}

    def after_step(self, engine, step: int) -> None:
        """Zero each row of A and column of B outside its most important entries, once the schedule prunes."""
        keep = self.keep(step)
        if keep >= 1.0:
            return
        scores = self.whole_scores()
        for module, (a, b) in self.factors.items():
            mask_a, mask_b = factor_masks(scores[f"{module}.A"], scores[f"{module}.B"], keep)
            zero3.zero_outside(a, mask_a)
            zero3.zero_outside(b, mask_b)

    def checkpoint_slices(self) -> dict:
        named = self._named_params()
        return {f"scores/{name}": slice_of(named[name], score) for name, score in self.scores.items()}

    def final_budget(self) -> int:
        """The most non-zeros the factors hold once the schedule ends: r x (kept per column of B + kept per
        row of A), summed over the targeted weights."""
        final = 1.0 - self.config.rose_sparsity
        return sum(self.config.lora_r * (kept_per_line(rows, final) + kept_per_line(cols, final))
                   for rows, cols in self.target_shapes.values())

    def side_record(self, nonzeros: int) -> dict:
        c = self.config
        return {"method": self.name, "trainable": self.dense_count(), "nonzeros": nonzeros,
                "final_budget": self.final_budget(), "rose_sparsity": c.rose_sparsity, "rose_start": c.rose_start,
                "rose_end": c.rose_end, "rose_beta": c.rose_beta}

    def describe(self) -> str:
        c = self.config
        return (f"{super().describe()} while dense; pruned per row and column from {c.rose_start:.0%} of the steps "
                f"to at most {self.final_budget():,} non-zeros at {c.rose_end:.0%}")
