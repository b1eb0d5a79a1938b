"""Salience metrics: a registry of per-element scores over statistics accumulated per ZeRO-3 shard.

A metric declares which statistics it needs (see shard_grads.py); compute_salience runs only those
passes and hands the metric one weight's shard at a time, so no rank ever holds a full score tensor.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.distributed as dist
from torch import nn

from ...config import ConfigError
from ...runtime import zero3
from ...runtime.distributed import device as comm_device
from . import shard_grads


@dataclass
class ShardStats:
    """What a metric may read for one weight: this rank's real (non-padding) elements, from flat `start`."""
    name: str
    start: int
    size: int
    weight: torch.Tensor | None                # W (None for metrics that never read it)
    seed: int
    grad: torch.Tensor | None = None           # g, the calibration-loss gradient
    grad_sq: torch.Tensor | None = None        # mean over examples of the per-example gradient squared
    example_grad_sum: torch.Tensor | None = None  # sum over examples of g_i, each example's mean-loss gradient
    example_grad_sq_sum: torch.Tensor | None = None  # sum over examples of g_i^2
    general_grad_sq: torch.Tensor | None = None  # grad_sq on the general text (--fisher_text)
    synflow_grad: torch.Tensor | None = None   # SynFlow's gradient (non-negative weights, linearised model)
    hessian_grad: torch.Tensor | None = None   # H g
    input_norm: torch.Tensor | None = None     # per input channel of the whole weight: ||x_j|| over the tokens


@dataclass(frozen=True)
class Metric:
    score: Callable[[ShardStats], torch.Tensor]
    needs: tuple[str, ...]  # gradient statistics (ShardStats fields) it reads
    reads_weight: bool      # False: it scores a quantized base too (see config.WEIGHT_FREE_METRICS)


METRICS: dict[str, Metric] = {}


def register_metric(name: str, needs: tuple[str, ...] = (), reads_weight: bool = True):
    def register(fn: Callable[[ShardStats], torch.Tensor]):
        METRICS[name] = Metric(fn, needs, reads_weight)
        return fn
    return register


def _mix32(h: torch.Tensor) -> torch.Tensor:
    """MurmurHash3's 32-bit finaliser on int64 tensors holding values below 2^32."""
    mask = 0xFFFFFFFF
    h = h ^ (h >> 16)
    h = (h * 0x85EBCA6B) & mask
    h = h ^ (h >> 13)
    h = (h * 0xC2B2AE35) & mask
    return h ^ (h >> 16)


@register_metric("random", reads_weight=False)
def random_score(s: ShardStats) -> torch.Tensor:
    """Uniform in [0, 1), a hash of (seed, module name, flat index): the same for any world size."""
    key = (zlib.crc32(s.name.encode()) ^ _mix32(torch.tensor(s.seed & 0xFFFFFFFF)).item()) & 0xFFFFFFFF
    flat = torch.arange(s.start, s.start + s.size, dtype=torch.int64, device=comm_device())
    h = _mix32(_mix32((flat >> 32) ^ key) ^ (flat & 0xFFFFFFFF))
    return (h >> 8).float() / float(1 << 24)


@register_metric("magnitude")
def magnitude_score(s: ShardStats) -> torch.Tensor:
    return s.weight.abs()


@register_metric("gradient", needs=("grad",), reads_weight=False)
def gradient_score(s: ShardStats) -> torch.Tensor:
    # |mean gradient| (abs after accumulation), as the paper's reference code does.
    return s.grad.abs()


@register_metric("gradient_over_input", needs=("grad", "input_norm"), reads_weight=False)
def gradient_over_input_score(s: ShardStats) -> torch.Tensor:
    # |g_ij| grows with ||x_j|| (dW = dY^T X), which crowds a plain gradient mask onto the loudest input
    # channels, whose change every token then carries: dividing by it ranks entries within their channel's scale.
    columns = torch.arange(s.start, s.start + s.size, device=s.grad.device) % s.input_norm.numel()
    norms = s.input_norm.to(s.grad.device, torch.float32)[columns]
    return s.grad.abs() / norms.clamp_min(torch.finfo(torch.float32).tiny)


# A ratio's floor under its denominator, relative to the weight's largest denominator: entries whose
# gradients are near zero (rounding, dead channels) must not rank high by dividing a crumb by a crumb.
RATIO_EPS = 1e-8


def _largest(t: torch.Tensor) -> torch.Tensor:
    """The largest entry of a weight over every rank's shard (a collective: every rank scores the same weights
    in the same order)."""
    peak = (t.max() if t.numel() else torch.zeros((), device=t.device)).to(comm_device(), torch.float32)
    if dist.is_initialized():
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    return peak.to(t.device)


@register_metric("gradient_snr", needs=("example_moments",), reads_weight=False)
def gradient_snr_score(s: ShardStats) -> torch.Tensor:
    # |sum_i g_i| / sqrt(sum_i g_i^2): every g_i of an entry carries its input's ||x_j|| as a factor, which
    # divides out, so the score ranks how consistently an entry's gradient points one way, which is also
    # how far Adam will move it, not how loud its input channel is.
    squares = s.example_grad_sq_sum
    return s.example_grad_sum.abs() / (squares + RATIO_EPS * _largest(squares)).sqrt().clamp_min(
        torch.finfo(torch.float32).tiny)


@register_metric("gradient_over_fisher", needs=("grad", "general_grad_sq"), reads_weight=False)
def gradient_over_fisher_score(s: ShardStats) -> torch.Tensor:
    # The task's pull on an entry over how much a general text's loss depends on it (its diagonal Fisher):
    # entries the general text is sensitive to, such as those on massive-activation channels, rank low.
    fisher = s.general_grad_sq
    return s.grad.abs() / (fisher + RATIO_EPS * _largest(fisher)).sqrt().clamp_min(torch.finfo(torch.float32).tiny)


@register_metric("snip", needs=("grad",))
def snip_score(s: ShardStats) -> torch.Tensor:
    return (s.weight * s.grad).abs()


@register_metric("force", needs=("grad",))
def force_score(s: ShardStats) -> torch.Tensor:
    return -(s.weight * s.grad)


@register_metric("taylor", needs=("grad",))
def taylor_score(s: ShardStats) -> torch.Tensor:
    return (s.weight * s.grad).square()


@register_metric("fisher", needs=("grad_sq",), reads_weight=False)
def fisher_score(s: ShardStats) -> torch.Tensor:
    return s.grad_sq


@register_metric("synflow", needs=("synflow_grad",))
def synflow_score(s: ShardStats) -> torch.Tensor:
    return (s.weight.abs() * s.synflow_grad).abs()


@register_metric("grasp", needs=("grad", "hessian_grad"))
def grasp_score(s: ShardStats) -> torch.Tensor:
    return -(s.hessian_grad * s.weight)


def get_metric(name: str) -> Metric:
    if name not in METRICS:
        raise ConfigError(f"unknown --metric '{name}': choose one of {', '.join(sorted(METRICS))}")
    return METRICS[name]


@dataclass
class ShardScores:
    """Scores of the real (non-padding) elements this rank holds of one weight, from flat index `start`."""
    start: int
    scores: torch.Tensor
    numel: int  # elements of the whole weight
    accumulator_numel: int  # elements of the largest fp32 accumulator this rank kept for it (0: none)


def _statistics(needs: tuple[str, ...], model: nn.Module, targets: dict[str, nn.Module], batches: list[dict],
                general_batches: list[dict] | None, show_progress: bool, offload: bool,
                desc: str) -> dict[str, dict[str, torch.Tensor]]:
    stats = {}
    if "grad" in needs:
        stats["grad"] = shard_grads.gradient(model, targets, batches, show_progress, offload=offload, desc=desc)
    if "grad_sq" in needs:
        stats["grad_sq"] = shard_grads.mean_squared_example_gradient(model, targets, batches, show_progress,
                                                                     offload=offload, desc=desc)
    if "example_moments" in needs:
        stats["example_grad_sum"], stats["example_grad_sq_sum"] = shard_grads.example_gradient_moments(
            model, targets, batches, show_progress, offload=offload, desc=desc)
    if "general_grad_sq" in needs:
        if not general_batches:
            raise ConfigError("this --metric reads a general text's gradients: pass --fisher_text")
        stats["general_grad_sq"] = shard_grads.mean_squared_example_gradient(
            model, targets, general_batches, show_progress, offload=offload, desc=f"{desc} (general text)")
    if "synflow_grad" in needs:
        stats["synflow_grad"] = shard_grads.synflow_gradient(model, targets, offload=offload)
    if "hessian_grad" in needs:
        stats["hessian_grad"] = shard_grads.hessian_gradient(model, targets, batches, stats["grad"], show_progress,
                                                             offload=offload, desc=desc)
    return stats


def compute_salience(model: nn.Module, targets: dict[str, nn.Module], batches: list[dict],
                     metric: str = "gradient", seed: int = 0, show_progress: bool = True, offload: bool = False,
                     desc: str = "salience", general_batches: list[dict] | None = None) -> dict[str, ShardScores]:
    """Score every targeted weight on this rank's shard.

    `batches` are this rank's calibration micro-batches (every rank must pass the same number), and
    `general_batches` its micro-batches of the general text for metrics that read one. With `offload` the
    statistics and scores live in host memory. Each weight's statistics are freed as soon as it is scored,
    so the peak is one set of statistics plus one weight's scores.
    """
    chosen = get_metric(metric)
    if chosen.needs and shard_grads.calibration_tokens(batches) == 0:
        raise ConfigError("the calibration examples have no loss tokens: check --response_field / --seq_len")
    stats = _statistics(chosen.needs, model, targets, batches, general_batches, show_progress, offload, desc)
    norms = (shard_grads.input_channel_norms(model, targets, batches, show_progress, desc)
             if "input_norm" in chosen.needs else {})
    where = torch.device("cpu") if offload else comm_device()
    scores = {}
    for name, module in targets.items():
        start, stop = zero3.shard_range(module.weight)
        n = stop - start
        own = {key: per_name.pop(name) for key, per_name in stats.items()}
        weight = zero3.local_shard(module.weight)[:n].to(where, torch.float32) if chosen.reads_weight else None
        shard = ShardStats(name, start, n, weight, seed, **{key: t[:n] for key, t in own.items()},
                           input_norm=norms.pop(name, None))
        scores[name] = ShardScores(start, chosen.score(shard).to(where, torch.float32), zero3.full_numel(module.weight),
                                   max((t.numel() for t in own.values()), default=0))
        del own, shard
    return scores


def score_groups(model: nn.Module, targets: dict[str, nn.Module], groups: list[list[str]], batches: list[dict],
                 metric: str = "gradient", seed: int = 0, show_progress: bool = True, offload: bool = False,
                 release: Callable[[], None] = lambda: None,
                 general_batches: list[dict] | None = None) -> Iterator[dict[str, ShardScores]]:
    """compute_salience for one group of targets at a time (one pass over the calibration set each): only
    one group's statistics exist at once, and each pass's backward stops below its group's lowest block.

    `release` runs after each pass: the engine's empty_partition_cache, since ZeRO-3 hands back the weights
    it prefetched for a backward only in an optimizer step, which the salience pass never takes."""
    if len(groups) > 1 and metric == "grasp":
        raise ConfigError("--metric grasp nudges every targeted weight at once, so it cannot score them in groups: "
                          "use --salience_chunks 1 (with --salience_offload cpu where that does not fit)")
    for i, names in enumerate(groups):
        desc = "salience" if len(groups) == 1 else f"salience {i + 1}/{len(groups)}"
        scores = compute_salience(model, {name: targets[name] for name in names}, batches, metric, seed,
                                  show_progress, offload, desc, general_batches)
        release()
        yield scores
        # The consumer has merged this group: without this the next group's pass would run beside its scores.
        del scores
