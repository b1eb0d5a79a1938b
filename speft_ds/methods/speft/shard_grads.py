"""Gradient statistics of frozen weights, accumulated per ZeRO-3 shard.

Each rank keeps one fp32 accumulator the size of its own partition of each targeted weight. A layer's
weight gradient (dY^T X for a linear layer) is formed from the activations its hooks see,
reduce-scattered at once so every rank adds only its slice, and dropped: nothing full-size outlives one
layer's backward, and the frozen base weights never get requires_grad or a .grad.

Every pass here returns, per target name, this rank's accumulator (ds_tensor-sized, padding included).
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator
from torch import nn
from tqdm import tqdm

from ...data.batches import model_inputs
from ...data.losses import causal_lm_loss_sum, per_example_mean_loss_sum
from ...models.loading import block_of, decoder_blocks
from ...runtime import zero3
from ...runtime.distributed import device as comm_device, release_freed_memory
from .delta import weight_grad_fn

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (logits, labels) -> scalar loss


class _ShardAccumulator:
    """Hooks adding each targeted layer's weight-gradient statistics into accumulators (fp32: the smallest
    dtype that keeps the selection, bench/quality/accumulator_dtype.py), on the accelerator or, with
    `offload`, in (pinned) host memory. `statistics` names what is accumulated per weight: "sum", the
    batch's dW; "example_squares", the sum over its examples of each example's dW squared.

    A layer's reduce-scatters run while the backward computes the layer before it; at most one layer's are
    in flight, so no more than two layers' statistics exist at a time."""

    def __init__(self, targets: dict[str, nn.Module], statistics: tuple[str, ...], dtype: torch.dtype, offload: bool):
        self.targets = targets
        self.accumulators = {stat: {name: _zeros(zero3.shard_numel(m.weight), dtype, offload)
                                    for name, m in targets.items()} for stat in statistics}
        self._handles = [m.register_forward_hook(self._forward_hook(name)) for name, m in targets.items()]
        self._in_flight: list[Callable[[], None]] = []

    def _forward_hook(self, name: str):
        def hook(module, inputs, output):
            if output.requires_grad:
                x = inputs[0].detach()  # the embedding's token ids, or the linear layer's input
                output.register_hook(lambda grad_out: self._accumulate(name, x, grad_out))
        return hook

    def _accumulate(self, name: str, x: torch.Tensor, grad_out: torch.Tensor) -> None:
        module = self.targets[name]
        grad_fn, shape = weight_grad_fn(module), tuple(zero3.full_shape(module.weight))
        x = x.float() if x.is_floating_point() else x
        grad_out = grad_out.float()
        formed = {}
        if "sum" in self.accumulators:
            formed["sum"] = grad_fn(x, grad_out, shape)
        if "example_squares" in self.accumulators:
            formed["example_squares"] = sum(grad_fn(x[i], grad_out[i], shape).square() for i in range(x.shape[0]))
        self.finish_in_flight()
        self._in_flight = [zero3.start_reduce_scatter_add(self.accumulators[stat][name], grad_w.view(-1), module.weight)
                           for stat, grad_w in formed.items()]

    def finish_in_flight(self) -> None:
        for finish in self._in_flight:
            finish()
        self._in_flight = []

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def _zeros(numel: int, dtype: torch.dtype, offload: bool) -> torch.Tensor:
    if offload:
        return get_accelerator().pin_memory(torch.zeros(numel, dtype=dtype))
    return torch.zeros(numel, dtype=dtype, device=comm_device())


def _hidden_states_leaf(module, args, kwargs):
    """A block's input as a new leaf that asks for gradients: autograd records nothing below this block.

    Registered ahead of ZeRO-3's own pre-forward hook, which must see an input that asks for gradients:
    it attaches the release of the block's gathered weights to that input's backward (otherwise every
    pass in groups left its lowest block gathered: +9 weights per group, seen on a 1.1B model)."""
    if args:
        return (args[0].detach().requires_grad_(True), *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": kwargs["hidden_states"].detach().requires_grad_(True)}


@contextlib.contextmanager
def _gradients_from_lowest_target(model: nn.Module, targets: dict[str, nn.Module]):
    """Make the backward reach every target and stop below the lowest decoder block holding one.

    The base weights are frozen, so no gradient flows unless an input asks for one: the lowest block's
    input where every target sits inside a block, else the embedding output. Blocks from there up
    recompute their activations in the backward where gradient checkpointing is on (it only acts on
    blocks in training mode; the pass keeps the rest of the model in eval mode, without dropout); blocks
    below run without autograd, as in inference."""
    blocks = decoder_blocks(model)
    owners = [block_of(name, blocks) for name in targets]
    handles, checkpointed = [], []
    require_input_grads = bool(getattr(model, "_require_grads_hooks", None))  # gradient checkpointing's
    if require_input_grads:
        model.disable_input_require_grads()
    try:
        if all(owners):
            names = list(blocks)
            lowest = min(names.index(owner) for owner in owners)
            handles.append(blocks[names[lowest]].register_forward_pre_hook(_hidden_states_leaf, with_kwargs=True,
                                                                            prepend=True))
            checkpointed = [b for b in list(blocks.values())[lowest:] if getattr(b, "gradient_checkpointing", False)]
        else:
            handles.append(model.get_input_embeddings().register_forward_hook(lambda m, i, out: out.requires_grad_(True)))
            checkpointed = [b for b in blocks.values() if getattr(b, "gradient_checkpointing", False)]
        for block in checkpointed:
            block.training = True  # the block alone: its submodules' dropout stays off
        yield
    finally:
        for handle in handles:
            handle.remove()
        for block in checkpointed:
            block.training = False
        if require_input_grads:
            model.enable_input_require_grads()


@contextlib.contextmanager
def _accumulating(model: nn.Module, targets: dict[str, nn.Module], statistics: tuple[str, ...] = ("sum",),
                  dtype: torch.dtype = torch.float32, offload: bool = False):
    was_training = model.training
    model.eval()  # no dropout: the statistics are of the model as it is
    # Entered before the accumulator's hooks exist, so an embedding target's output already asks for gradients.
    with _gradients_from_lowest_target(model, targets):
        accumulator = _ShardAccumulator(targets, statistics, dtype, offload)
        try:
            yield accumulator.accumulators
            accumulator.finish_in_flight()
        finally:
            accumulator.remove()
            model.train(was_training)


def _backward_over(model: nn.Module, batches: list[dict], loss_fn: LossFn, desc: str, show_progress: bool) -> None:
    for batch in tqdm(batches, desc=desc, disable=not show_progress):
        batch = {key: value.to(comm_device()) for key, value in batch.items()}
        logits = model(**model_inputs(batch), use_cache=False).logits
        loss_fn(logits, batch["labels"]).backward()
        del logits
        release_freed_memory()


@torch.no_grad()
def input_channel_norms(model: nn.Module, targets: dict[str, nn.Module], batches: list[dict],
                        show_progress: bool = False, desc: str = "salience") -> dict[str, torch.Tensor]:
    """Per targeted layer, the L2 norm over every calibration token (padding and filler batches left out)
    of each input channel: a forward pass whose hooks add up x^2 per channel, summed over ranks. A few
    numbers per layer, so every rank holds them whole."""
    sums: dict[str, torch.Tensor] = {}
    mask: list[torch.Tensor | None] = [None]  # the batch's token mask, read by the hooks

    def add_squares(name: str):
        def hook(module, inputs):
            x = inputs[0].detach().double()
            squares = x.square() if mask[0] is None else x.square() * mask[0][..., None]
            total = squares.reshape(-1, x.shape[-1]).sum(0)
            sums[name] = total if name not in sums else sums[name] + total
        return hook

    handles = [module.register_forward_pre_hook(add_squares(name)) for name, module in targets.items()]
    try:
        for batch in tqdm(batches, desc=f"{desc} (input norms)", disable=not show_progress):
            if not (batch["labels"] != -100).any():  # a filler batch: a copy that keeps ZeRO-3 in step
                mask[0] = torch.zeros_like(batch["input_ids"], dtype=torch.float64, device=comm_device())
            else:
                mask[0] = batch["attention_mask"].to(comm_device(), torch.float64) if "attention_mask" in batch else None
            model(**{key: value.to(comm_device()) for key, value in model_inputs(batch).items()}, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    for name in targets:
        if dist.is_initialized():
            dist.all_reduce(sums[name])
        sums[name] = sums[name].sqrt()
    return sums


def global_count(local: int) -> int:
    total = torch.tensor(local, dtype=torch.int64, device=comm_device())
    if dist.is_initialized():
        dist.all_reduce(total)
    return int(total)


def calibration_tokens(batches: list[dict]) -> int:
    """Loss tokens in the whole calibration set, over all ranks."""
    return global_count(sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches))


def calibration_examples(batches: list[dict]) -> int:
    """Examples with at least one loss token, over all ranks (filler batches have none)."""
    return global_count(sum(int((b["labels"][:, 1:] != -100).any(dim=1).sum()) for b in batches))


def gradient(model: nn.Module, targets: dict[str, nn.Module], batches: list[dict], show_progress: bool = False,
             dtype: torch.dtype = torch.float32, offload: bool = False, desc: str = "salience") -> dict[str, torch.Tensor]:
    """g = d(summed token loss / total loss tokens of the calibration set)/dW: independent of how the
    calibration set is cut into micro-batches and ranks. `dtype`: the accumulators'; `offload`: keep them
    in host memory."""
    total_tokens = calibration_tokens(batches)
    with _accumulating(model, targets, ("sum",), dtype=dtype, offload=offload) as accumulators:
        _backward_over(model, batches, lambda logits, labels: causal_lm_loss_sum(logits, labels)[0] / total_tokens,
                       desc, show_progress)
    return accumulators["sum"]


def mean_squared_example_gradient(model: nn.Module, targets: dict[str, nn.Module], batches: list[dict],
                                  show_progress: bool = False, offload: bool = False,
                                  desc: str = "salience") -> dict[str, torch.Tensor]:
    """(1/N) sum_i (d loss_i / dW)^2, loss_i the mean token loss of example i (the empirical Fisher)."""
    with _accumulating(model, targets, ("example_squares",), offload=offload) as accumulators:
        _backward_over(model, batches, per_example_mean_loss_sum, f"{desc} (fisher)", show_progress)
    n = calibration_examples(batches)
    return {name: acc.div_(max(n, 1)) for name, acc in accumulators["example_squares"].items()}


def example_gradient_moments(model: nn.Module, targets: dict[str, nn.Module], batches: list[dict],
                             show_progress: bool = False, offload: bool = False,
                             desc: str = "salience") -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(sum_i g_i, sum_i g_i^2), g_i = d loss_i / dW with loss_i the mean token loss of example i, in one
    backward pass: per example, so that neither depends on how the examples are cut into batches and ranks."""
    with _accumulating(model, targets, ("sum", "example_squares"), offload=offload) as accumulators:
        _backward_over(model, batches, per_example_mean_loss_sum, f"{desc} (per example)", show_progress)
    return accumulators["sum"], accumulators["example_squares"]


_ACTIVATION_MODULES = ("torch.nn.modules.activation", "transformers.activations")


def synflow_gradient(model: nn.Module, targets: dict[str, nn.Module], offload: bool = False) -> dict[str, torch.Tensor]:
    """d sum(logits)/dW for the model with every weight made non-negative, activation modules replaced by
    the identity and an all-ones input embedding of one token (SynFlow, as the paper's code computes it).
    Attention's softmax stays; over a single token it is 1 anyway."""
    params = list(model.parameters())
    identity_hooks = [m.register_forward_hook(lambda m, inputs, out: inputs[0]) for m in model.modules()
                      if type(m).__module__ in _ACTIVATION_MODULES]
    world = dist.get_world_size() if dist.is_initialized() else 1
    try:
        with zero3.preserved_shards(params), _accumulating(model, targets, ("sum",), offload=offload) as accumulators:
            with torch.no_grad():
                for param in params:
                    zero3.local_shard(param).abs_()
            hidden = model.get_input_embeddings().embedding_dim
            shard = zero3.local_shard(params[0])
            ones = torch.ones(1, 1, hidden, dtype=shard.dtype, device=shard.device, requires_grad=True)
            # Every rank runs the same pass (ZeRO-3 gathers collectively); the reduce-scatter sums them.
            (model(inputs_embeds=ones).logits.float().sum() / world).backward()
    finally:
        for hook in identity_hooks:
            hook.remove()
    return accumulators["sum"]


def _global_norm(shards: list[torch.Tensor]) -> float:
    total = torch.tensor(sum(float(s.double().square().sum()) for s in shards), dtype=torch.float64,
                         device=comm_device())
    if dist.is_initialized():
        dist.all_reduce(total)
    return float(total.sqrt())


# Perturbation size of the finite difference, relative to the targeted weights' norm: large enough that
# fp32 rounding of the two gradients stays small against their difference, small enough that the
# central difference's O(step^2) error is negligible (see tests/distributed/test_metrics.py).
HESSIAN_STEP = 1e-3


def hessian_gradient(model: nn.Module, targets: dict[str, nn.Module], batches: list[dict],
                     grad: dict[str, torch.Tensor], show_progress: bool = False, offload: bool = False,
                     desc: str = "salience") -> dict[str, torch.Tensor]:
    """H g (H: Hessian of the calibration loss over the targeted weights) by a central difference of
    gradients, (g(W + eps g) - g(W - eps g)) / (2 eps), with each rank nudging only its own shards and
    the weights restored bit-exactly afterwards. It nudges every targeted weight at once, so `targets`
    must be all of them; it holds three sets of accumulators (g and the two nudged gradients)."""
    ranges = {name: zero3.shard_range(m.weight) for name, m in targets.items()}
    valid = {name: grad[name][:stop - start] for name, (start, stop) in ranges.items()}
    weights = [zero3.local_shard(m.weight)[:stop - start] for m, (start, stop) in zip(targets.values(), ranges.values())]
    eps = HESSIAN_STEP * _global_norm(weights) / max(_global_norm(list(valid.values())), 1e-30)
    gradients = []
    for sign in (1.0, -1.0):
        with zero3.preserved_shards(m.weight for m in targets.values()):
            with torch.no_grad():
                for name, module in targets.items():
                    shard = zero3.local_shard(module.weight)
                    shard[:valid[name].numel()] += (sign * eps * valid[name]).to(shard)
            gradients.append(gradient(model, targets, batches, show_progress, offload=offload,
                                      desc=f"{desc} (grasp {'+' if sign > 0 else '-'})"))
    plus, minus = gradients
    # In place, each nudged pair freed as it is used: never a fourth set.
    return {name: plus.pop(name).sub_(minus.pop(name)).div_(2 * eps) for name in list(targets)}
