"""Salience scores, computed per ZeRO-3 shard.

Each rank keeps one fp32 accumulator the size of its own partition of each targeted weight. A layer's
weight gradient dW = dY^T X is formed from the activations its hooks see, reduce-scattered at once so
every rank adds only its slice, and dropped: nothing full-size outlives one layer's backward, and the
frozen base weights never get requires_grad or a .grad.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from . import zero3
from .config import ConfigError
from .delta import weight_grad_fn
from .losses import causal_lm_loss_sum

# name -> score(accumulated signed gradient shard, weight shard) -> score shard
MetricFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
METRICS: dict[str, MetricFn] = {}


def register_metric(name: str):
    def register(fn: MetricFn) -> MetricFn:
        METRICS[name] = fn
        return fn
    return register


@register_metric("gradient")
def gradient_score(grad: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    # |mean gradient| (abs after accumulation), as the paper's reference code does.
    return grad.abs()


def get_metric(name: str) -> MetricFn:
    if name not in METRICS:
        raise ConfigError(f"unknown --metric '{name}': choose one of {', '.join(sorted(METRICS))}")
    return METRICS[name]


@dataclass
class ShardScores:
    """Scores of the real (non-padding) elements this rank holds of one weight, from flat index `start`."""
    start: int
    scores: torch.Tensor
    numel: int  # elements of the whole weight
    accumulator_numel: int  # elements of the fp32 accumulator this rank kept (its ZeRO-3 slice, padding included)


class _ShardGradientAccumulator:
    """Hooks that add each targeted layer's dW slice into a per-shard fp32 accumulator.

    dW comes from the layer's input and output gradient (dY^T X for a linear layer), so the frozen
    weight itself never needs a gradient."""

    def __init__(self, targets: dict[str, nn.Module]):
        self.targets = targets
        self.accumulators = {name: torch.zeros(zero3.shard_numel(m.weight), dtype=torch.float32)
                             for name, m in targets.items()}
        self._handles = [m.register_forward_hook(self._forward_hook(name)) for name, m in targets.items()]

    def _forward_hook(self, name: str):
        def hook(module, inputs, output):
            if output.requires_grad:
                x = inputs[0].detach()  # the embedding's token ids, or the linear layer's input
                output.register_hook(lambda grad_out: self._accumulate(name, x, grad_out))
        return hook

    def _accumulate(self, name: str, x: torch.Tensor, grad_out: torch.Tensor) -> None:
        module = self.targets[name]
        grad_fn = weight_grad_fn(module)
        inputs = x.float() if x.is_floating_point() else x
        grad_w = grad_fn(inputs, grad_out.float(), tuple(zero3.full_shape(module.weight)))
        zero3.reduce_scatter_add(self.accumulators[name], grad_w.view(-1), module.weight)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def compute_salience(model: nn.Module, targets: dict[str, nn.Module], batches: list[dict],
                     metric: str = "gradient", show_progress: bool = True) -> dict[str, ShardScores]:
    """Score every targeted weight on this rank's shard.

    `batches` are this rank's calibration micro-batches (every rank must pass the same number). The loss
    is the summed token loss over the whole calibration set on all ranks, divided by its total number
    of loss tokens, so the scores do not depend on micro-batch size or world size.
    """
    score_fn = get_metric(metric)
    total_tokens = torch.tensor(sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches), dtype=torch.int64)
    if dist.is_initialized():
        dist.all_reduce(total_tokens)
    if total_tokens.item() == 0:
        raise ConfigError("the calibration examples have no loss tokens: check --response_field / --seq_len")

    # The base weights stay frozen, so gradients reach the layers only if the embedding output asks for one.
    # Registered before the accumulator's hooks, so an embedding target already sees it.
    embed_hook = model.get_input_embeddings().register_forward_hook(lambda m, i, out: out.requires_grad_(True))
    accumulator = _ShardGradientAccumulator(targets)
    was_training = model.training
    model.eval()  # no dropout: the score is the gradient of the model as it is
    try:
        for batch in tqdm(batches, desc="salience", disable=not show_progress):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            loss_sum, _ = causal_lm_loss_sum(logits, batch["labels"])
            (loss_sum / total_tokens.item()).backward()
    finally:
        embed_hook.remove()
        accumulator.remove()
        model.train(was_training)

    scores = {}
    for name, module in targets.items():
        start, stop = zero3.shard_range(module.weight)
        n = stop - start
        weight_shard = zero3.local_shard(module.weight)[:n].float()
        scores[name] = ShardScores(start, score_fn(accumulator.accumulators[name][:n], weight_shard),
                                   zero3.full_numel(module.weight), accumulator.accumulators[name].numel())
    return scores
