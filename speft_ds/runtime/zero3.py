"""The only module that touches DeepSpeed ZeRO-3 internals (ds_tensor, ds_numel, partition layout).

ZeRO-3 splits a weight's flattened elements into world_size equal slices of ceil(numel / world_size);
rank r holds elements [r * ps, (r + 1) * ps) in `param.ds_tensor`, the last rank's tail being padding.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.runtime.zero import parameter_offload
from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus
from deepspeed.runtime.zero.partitioned_param_coordinator import PartitionedParameterCoordinator
from deepspeed.ops.adam import DeepSpeedCPUAdam
from deepspeed.utils import (safe_get_full_fp32_param, safe_get_full_optimizer_state, safe_get_local_fp32_param,
                             safe_get_local_grad, safe_get_local_optimizer_state, safe_set_local_fp32_param,
                             safe_set_local_optimizer_state)

from ..models.bnb_weights import is_quantized, packed_4bit_shape
from .distributed import device


def is_partitioned(param: torch.nn.Parameter) -> bool:
    return hasattr(param, "ds_tensor")


def full_shape(param: torch.nn.Parameter) -> torch.Size:
    """The dense weight's shape (a 4-bit weight's as it computes, not as stored packed)."""
    packed = packed_4bit_shape(param)
    if packed is not None:
        return packed
    return param.ds_shape if is_partitioned(param) else param.shape


def full_numel(param: torch.nn.Parameter) -> int:
    return full_shape(param).numel()


def shard_numel(param: torch.nn.Parameter) -> int:
    """Dense elements this rank's slice of `param` covers, padding included. A packed 4-bit weight's slice
    of stored elements covers a contiguous run of 2 x element_size codes per element."""
    if not is_partitioned(param):
        return full_numel(param)
    per_element = 2 * param.ds_tensor.element_size() if packed_4bit_shape(param) is not None else 1
    return param.ds_tensor.numel() * per_element


def _partition(param: torch.nn.Parameter) -> tuple[int, int, object]:
    """(rank within the parameter's group, dense slice size, group)."""
    group = param.ds_process_group
    return dist.get_rank(group), shard_numel(param), group


def shard_range(param: torch.nn.Parameter) -> tuple[int, int]:
    """[start, stop) of the real (non-padding) flat elements this rank holds."""
    if not is_partitioned(param):
        return 0, full_numel(param)
    rank, size, _ = _partition(param)
    start, numel = rank * size, full_numel(param)
    return min(start, numel), min(start + size, numel)


def local_shard(param: torch.nn.Parameter) -> torch.Tensor:
    """This rank's flat slice of `param` (padding included), without gathering. Not for quantized weights,
    whose slices hold codes rather than values."""
    if is_quantized(param):
        raise RuntimeError("a quantized weight's shard holds codes, not values: only weight-free metrics apply")
    return param.ds_tensor if is_partitioned(param) else param.detach().view(-1)


def start_reduce_scatter_add(accumulator: torch.Tensor, full_flat: torch.Tensor,
                             param: torch.nn.Parameter) -> Callable[[], None]:
    """Start summing `full_flat` (a full-size flat tensor) over ranks; the returned `finish()` waits for it
    and adds this rank's slice of the sum into `accumulator`. Until then the collective runs beside
    whatever this rank computes next."""
    if not is_partitioned(param):
        received, work = full_flat, None
        if dist.is_initialized() and dist.get_world_size() > 1:
            work = dist.all_reduce(full_flat, async_op=True)
    else:
        _, size, group = _partition(param)
        padding = size * dist.get_world_size(group) - full_flat.numel()
        sent = torch.nn.functional.pad(full_flat, (0, padding)) if padding else full_flat
        received = torch.empty(size, dtype=sent.dtype, device=sent.device)
        # torch 2.13 renamed reduce_scatter_tensor (now deprecated); older releases have only the old name.
        reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
        work = reduce_scatter(received, sent, group=group, async_op=True)

    def finish() -> None:
        if work is not None:
            work.wait()
        accumulator.add_(received)
    return finish


def gather_full_fp32(param: torch.nn.Parameter) -> torch.Tensor:
    """The whole trained parameter (its fp32 master copy), on every rank. A collective."""
    return safe_get_full_fp32_param(param).detach().cpu()


def gather_full(param: torch.nn.Parameter) -> torch.Tensor:
    """The whole of a frozen parameter (one with no fp32 master copy, like delta indices), on every rank.
    A collective."""
    with deepspeed.zero.GatheredParameters([param]):
        return param.detach().clone().cpu()


def local_grad_and_value(param: torch.nn.Parameter) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's slice (padded like ds_tensor) of a trained parameter's reduced gradient and of its fp32
    master value: between the last backward of an optimizer step and the step itself. No communication."""
    return safe_get_local_grad(param).detach().float().cpu(), safe_get_local_fp32_param(param).detach().float().cpu()


def gather_from_shards(params: list[torch.nn.Parameter], shards: list[torch.Tensor]) -> list[torch.Tensor]:
    """Whole flat tensors, on every rank (on the CPU), from each rank's padded slices laid out like `params`'
    partitions (such as a score kept per slice): one all-gather for all of them."""
    sent = torch.cat([s.float().flatten() for s in shards]).to(device())
    received = [torch.empty_like(sent) for _ in range(dist.get_world_size())]
    dist.all_gather(received, sent)
    received = [r.cpu() for r in received]
    whole, offset = [], 0
    for param in params:
        size = shard_numel(param)
        whole.append(torch.cat([r[offset:offset + size] for r in received])[:full_numel(param)])
        offset += size
    return whole


def local_slice(param: torch.nn.Parameter, whole: torch.Tensor) -> torch.Tensor:
    """This rank's slice of a whole tensor shaped like `param`, padded like its ds_tensor."""
    start, stop = shard_range(param)
    return torch.nn.functional.pad(whole.flatten()[start:stop], (0, shard_numel(param) - (stop - start)))


def zero_outside(param: torch.nn.Parameter, keep: torch.Tensor) -> None:
    """Set the trained parameter's entries where the whole mask `keep` is False to zero: in this rank's slice
    of the module's copy and of the optimizer's fp32 master, and in the whole copy ZeRO-3 keeps of a small
    'persistent' parameter. No communication: every rank holds the same mask. AdamW's moments stay, so a
    zeroed entry may regrow at the next step."""
    drop = local_slice(param, ~keep)
    with torch.no_grad():
        param.ds_tensor.masked_fill_(drop.to(param.ds_tensor.device), 0)
        master = safe_get_local_fp32_param(param).detach().clone()
        safe_set_local_fp32_param(param, master.masked_fill_(drop.to(master.device), 0))
        if is_persistent(param):  # gathered again after the step, and kept whole between forwards
            param.data.masked_fill_(~keep.view(param.data.shape).to(param.data.device), 0)


def is_persistent(param: torch.nn.Parameter) -> bool:
    """Whether ZeRO-3 keeps `param` whole on every rank between forwards (below
    stage3_param_persistence_threshold), beside its slice."""
    return bool(getattr(param, "ds_persist", False))


def set_trained_value(param: torch.nn.Parameter, whole: torch.Tensor) -> None:
    """Give a trained parameter the value `whole` (the full tensor, on every rank): this rank's slice of the
    module's copy and of the optimizer's fp32 master, and the whole copy ZeRO-3 keeps of a 'persistent'
    parameter. No communication."""
    set_trained_slice(param, local_slice(param, whole.float()))
    if is_persistent(param):
        with torch.no_grad():
            param.data.copy_(whole.view(param.data.shape).to(param.data))


def set_trained_slice(param: torch.nn.Parameter, mine: torch.Tensor) -> None:
    """Give this rank's slice (padded like ds_tensor) of a trained parameter the value `mine`: in the
    module's copy and in the optimizer's fp32 master. A persistent parameter's whole copy is left to the
    caller (set_trained_value). No communication."""
    with torch.no_grad():
        param.ds_tensor.copy_(mine.to(param.ds_tensor))
        safe_set_local_fp32_param(param, mine.to(safe_get_local_fp32_param(param)))


def local_trained_state(param: torch.nn.Parameter, moments: bool) -> dict[str, torch.Tensor]:
    """This rank's slice, without padding, of a trained parameter's fp32 master value and (with `moments`)
    of its AdamW moments: views of the optimizer's own partitions, nothing gathered or copied."""
    start, stop = shard_range(param)
    state = {"value": safe_get_local_fp32_param(param)}
    if moments:
        state.update({key: safe_get_local_optimizer_state(param, key) for key in ADAM_MOMENTS})
    return {key: t.detach().flatten()[:stop - start] for key, t in state.items()}


def resident_bytes(param: torch.nn.Parameter) -> int:
    """Bytes of `param` this rank keeps between gathers: its slice, or the whole where ZeRO-3 keeps a small
    parameter whole on every rank (below stage3_param_persistence_threshold) or does not partition it."""
    held = param.ds_tensor if is_partitioned(param) and not is_persistent(param) else param
    return held.numel() * held.element_size()


def destroy_engine(engine) -> None:
    """engine.destroy(), then drop the references DeepSpeed keeps to the engine's model, so the model, its
    partitions and their process groups are freed now: left until interpreter exit, gloo's threads torn
    down that late can abort a finished run ("terminate called without an active exception")."""
    modules = {id(m) for m in engine.module.modules()}
    engine.destroy()
    # Each forward pushes the model on a module-level stack, and not every forward (generate, eval) pops it.
    parameter_offload.FWD_MODULE_STACK[:] = [m for m in parameter_offload.FWD_MODULE_STACK if id(m) not in modules]
    # The coordinator memoises a method with a class-level lru_cache keyed on the coordinator itself; an
    # NVTX wrapper without functools.wraps sits around that cache, so look inside its closure too.
    memoised = PartitionedParameterCoordinator._PartitionedParameterCoordinator__params_to_release
    for candidate in (memoised, *(cell.cell_contents for cell in memoised.__closure__ or ())):
        if hasattr(candidate, "cache_clear"):
            candidate.cache_clear()


def optimizer_bytes(engine) -> int:
    """Bytes of optimizer state this rank keeps: its fp32 master partitions and every per-parameter state
    tensor (AdamW's two moments)."""
    optimizer = engine.optimizer
    master = sum(t.numel() * t.element_size() for t in optimizer.fp32_partitioned_groups_flat)
    return master + sum(v.numel() * v.element_size() for state in optimizer.optimizer.state.values()
                        for v in state.values() if torch.is_tensor(v) and v.dim() > 0)


def _check_released(param: torch.nn.Parameter) -> None:
    if not is_partitioned(param) or param.ds_status != ZeroParamStatus.NOT_AVAILABLE:
        raise RuntimeError(f"parameter {param.ds_id if is_partitioned(param) else '?'} is not a released "
                           "ZeRO-3 partition; its shard cannot be modified alone")


def add_to_shard(param: torch.nn.Parameter, flat_indices: torch.Tensor, values: torch.Tensor) -> None:
    """param.view(-1)[flat_indices] += values, each rank changing only the entries of its own shard."""
    _check_released(param)
    start, stop = shard_range(param)
    inside = (flat_indices >= start) & (flat_indices < stop)
    with torch.no_grad():
        param.ds_tensor.index_add_(0, (flat_indices[inside] - start).to(param.ds_tensor.device),
                                   values[inside].to(param.ds_tensor))


ADAM_MOMENTS = ("exp_avg", "exp_avg_sq")


def adam_moments(param: torch.nn.Parameter) -> dict[str, torch.Tensor]:
    """The whole AdamW moments of a trained parameter, on every rank (a collective)."""
    return {key: safe_get_full_optimizer_state(param, key).detach().cpu() for key in ADAM_MOMENTS}


def adam_step(engine) -> int:
    """The optimizer's step count (one count for every parameter of the engine)."""
    state = engine.optimizer.optimizer.state[engine.optimizer.fp32_partitioned_groups_flat[0]]
    return int(state["step"]) if state else 0


def seed_adam_state(engine, step: int, moments: dict[torch.nn.Parameter, dict[str, torch.Tensor]]) -> None:
    """Start a new engine's AdamW at `step`, with the given whole moments per parameter (zero elsewhere).

    torch's AdamW creates its state at the first step; creating it here instead lets kept entries keep
    their moments and bias correction across a mask update."""
    start_adam_state(engine, step)
    for param, states in moments.items():
        # This rank's slice, padded like ds_tensor (DeepSpeed's full setter mishandles the padding).
        set_local_moments(param, {key: local_slice(param, value) for key, value in states.items()})


def local_trained_slices(param: torch.nn.Parameter) -> dict[str, torch.Tensor]:
    """Copies of this rank's slices (padded like ds_tensor) of a trained parameter's fp32 master value and
    AdamW moments, on the CPU: what carrying it into the next engine needs, and nothing whole. No
    communication."""
    return {"value": safe_get_local_fp32_param(param).detach().float().cpu().clone(),
            **{key: safe_get_local_optimizer_state(param, key).detach().cpu().clone() for key in ADAM_MOMENTS}}


def carry_trained_slices(engine, step: int, kept: dict[torch.nn.Parameter, dict[str, torch.Tensor]]) -> None:
    """Start a new engine's AdamW at `step` with the parameters in `kept` as local_trained_slices took them
    from the last engine (their fp32 values, which the new masters took from the module's copy, and their
    moments); every other parameter starts from zero moments. A persistent parameter's whole module copy is
    the one the last engine left. No communication."""
    start_adam_state(engine, step)
    for param, state in kept.items():
        set_local_moments(param, {key: state[key] for key in ADAM_MOMENTS})
        set_trained_slice(param, state["value"])


def start_adam_state(engine, step: int) -> None:
    """A new engine's AdamW state at `step`, every moment zero."""
    optimizer = engine.optimizer
    # torch's AdamW counts steps in a tensor; DeepSpeed's CPU Adam (offload_optimizer) passes an int to its kernel
    count = step if isinstance(optimizer.optimizer, DeepSpeedCPUAdam) else torch.tensor(float(step))
    for flat in optimizer.fp32_partitioned_groups_flat:
        optimizer.optimizer.state[flat] = {"step": count, "exp_avg": torch.zeros_like(flat),
                                           "exp_avg_sq": torch.zeros_like(flat)}


def set_local_moments(param: torch.nn.Parameter, moments: dict[str, torch.Tensor]) -> None:
    """This rank's slices (padded like ds_tensor) of a trained parameter's AdamW moments, after
    start_adam_state."""
    for key, value in moments.items():
        safe_set_local_optimizer_state(param, value, key)


_LOSS_SCALE_FIELDS = ("cur_scale", "cur_iter", "last_overflow_iter", "cur_hysteresis")


def loss_scale_state(engine) -> dict:
    """The ZeRO-3 optimizer's loss scaler counters (fp16's dynamic scale; a constant 1 otherwise)."""
    scaler = engine.optimizer.loss_scaler
    return {key: float(getattr(scaler, key)) for key in _LOSS_SCALE_FIELDS if hasattr(scaler, key)}


def set_loss_scale_state(engine, state: dict) -> None:
    scaler = engine.optimizer.loss_scaler
    for key, value in state.items():
        setattr(scaler, key, type(getattr(scaler, key))(value))


@contextlib.contextmanager
def preserved_shards(params):
    """Let the block change parameters in place through `local_shard`; restore them bit-exactly after.

    Only for partitioned parameters that are not gathered at the time: their shard is then the only
    copy ZeRO-3 gathers from.
    """
    params = list(params)
    for param in params:
        _check_released(param)
    saved = [param.ds_tensor.detach().clone() for param in params]
    try:
        yield
    finally:
        with torch.no_grad():
            for param, original in zip(params, saved):
                param.ds_tensor.copy_(original)


def use_in_forward(module: torch.nn.Module, param: torch.nn.Parameter) -> None:
    """Have ZeRO-3 gather `param` around `module`'s forward and backward: for a parameter the module reads
    itself rather than through its owner's forward."""
    if is_partitioned(param):
        deepspeed.zero.register_external_parameter(module, param)


def partitioned_init(ds_config: dict):
    """Context in which new modules' parameters are partitioned as they are created."""
    return deepspeed.zero.Init(config_dict_or_path=ds_config)
