"""Per-rank memory of a speft-ds job, before it is launched: for the salience pass and for training.

Everything is counted from the model's shape and the job's settings, in bytes per rank, with no fitted
constant: what each tensor holds times its element size. Activations count the tensors a LLaMA decoder
layer keeps for its backward pass (with SDPA attention, no dropout); they are an estimate of what
autograd saves, the rest is the layout speft-ds and ZeRO-3 use.
"""

from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass, replace
from itertools import accumulate

from .ds_config import auto_prefetch_bucket_size

# The LLaMA shapes users ask about most (Meta's LLaMA-2 configs).
PRESETS = {
    "llama-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=32, vocab_size=32000),
    "llama-13b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                      num_key_value_heads=40, vocab_size=32000),
    "llama-70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                      num_key_value_heads=8, vocab_size=32000),
}

# Bytes per element of a quantized linear weight: 4-bit codes plus double-quantized block scales (one
# byte per 64 codes, one fp32 per 256 blocks); int8 codes plus one fp32 scale per output row (per in_features).
_QUANT_BYTES = {"nf4": 0.5 + 1 / 64 + 4 / (64 * 256), "fp4": 0.5 + 1 / 64 + 4 / (64 * 256), "int8": 1.0}


@dataclass(frozen=True)
class ModelShape:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool = False
    head_dim: int | None = None  # None: hidden // heads

    @classmethod
    def from_config(cls, config: dict) -> "ModelShape":
        return cls(config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"],
                   config["num_attention_heads"], config.get("num_key_value_heads") or config["num_attention_heads"],
                   config["vocab_size"], bool(config.get("tie_word_embeddings", False)), config.get("head_dim"))

    @property
    def q_dim(self) -> int:
        return (self.head_dim or self.hidden // self.heads) * self.heads

    @property
    def kv_dim(self) -> int:
        return (self.head_dim or self.hidden // self.heads) * self.kv_heads

    def layer_linears(self) -> dict[str, int]:
        """Elements of each linear weight of one decoder layer (the default targets)."""
        h, i = self.hidden, self.intermediate
        return {"q_proj": h * self.q_dim, "k_proj": h * self.kv_dim, "v_proj": h * self.kv_dim, "o_proj": h * self.q_dim,
                "gate_proj": h * i, "up_proj": h * i, "down_proj": h * i}

    @property
    def targeted(self) -> int:
        return self.layers * sum(self.layer_linears().values())

    @property
    def lora_in_plus_out(self) -> int:
        """in + out features summed over the targeted linears: LoRA's trainable count per unit of rank."""
        h, i = self.hidden, self.intermediate
        return self.layers * (2 * (h + self.q_dim) + 2 * (h + self.kv_dim) + 3 * (h + i))

    @property
    def embedding(self) -> int:
        return self.vocab * self.hidden

    @property
    def unquantized(self) -> int:
        """Embeddings, head and norms: what bitsandbytes leaves in the compute dtype."""
        return self.embedding * (1 if self.tied else 2) + self.hidden * (2 * self.layers + 1)

    @property
    def total(self) -> int:
        return self.targeted + self.unquantized

    @property
    def largest_module(self) -> int:
        """The most elements ZeRO-3 gathers for one module's forward (the embedding or the head, mostly)."""
        return max(self.embedding, *self.layer_linears().values())


# fp32 statistics sets a metric keeps per targeted element while it accumulates (grasp holds g while it
# forms g(W + eps g) and g(W - eps g)); metrics with none still hold one set of scores per group.
ACCUMULATOR_SETS = {"random": 0, "magnitude": 0, "gradient": 1, "gradient_over_input": 1, "gradient_snr": 2,
                    "gradient_over_fisher": 2, "snip": 1, "force": 1, "taylor": 1, "fisher": 1, "synflow": 1, "grasp": 3}
# Bytes per selected entry kept between groups: its fp32 score and its int64 position key.
_CANDIDATE_BYTES = 12


@dataclass(frozen=True)
class Job:
    world_size: int
    density: float
    seq_len: int
    micro_batch: int
    bf16: bool = True
    quantize: str | None = None
    gradient_checkpointing: bool = False
    delta_scaling: bool = False  # --delta_scaling input_channel: a per-entry scale beside each value
    offload_param: bool = False
    offload_optimizer: bool = False
    prefetch_elements: int | None = None  # stage3_prefetch_bucket_size; None: "auto"
    max_live_elements: int = int(1e9)     # stage3_max_live_parameters: gathered weights ZeRO-3 may keep
    metric: str = "gradient"
    salience_chunks: int = 1              # groups of targeted weights, one pass over the calibration set each
    salience_offload: bool = False        # salience accumulators in host memory
    # (elements, decoder layer where the module's backward starts) per targeted weight, in model order;
    # None: every linear of every decoder layer (the default targets).
    targets: tuple[tuple[int, int], ...] | None = None


def zero_settings(zero: dict) -> dict:
    """The Job fields a ds_config's zero_optimization block sets (DeepSpeed's defaults where absent)."""
    prefetch, max_live = (zero.get(key, "auto") for key in ("stage3_prefetch_bucket_size", "stage3_max_live_parameters"))
    return dict(offload_param=zero.get("offload_param", {}).get("device") == "cpu",
                offload_optimizer=zero.get("offload_optimizer", {}).get("device") == "cpu",
                prefetch_elements=None if prefetch == "auto" else int(prefetch),
                max_live_elements=int(1e9) if max_live == "auto" else int(max_live))


def contiguous_groups(sizes: list[int], n: int) -> list[range]:
    """Split positions 0..len(sizes)-1 into n non-empty runs in order, of about equal total size: run g
    ends where the running total comes closest to (g + 1) / n of the whole."""
    if not 1 <= n <= len(sizes):
        raise ValueError(f"cannot split {len(sizes)} weights into {n} groups")
    running = list(accumulate(sizes))
    bounds = [0]
    for g in range(1, n):
        target = running[-1] * g / n
        # the last position of run g - 1: nearest the target, leaving at least one weight per run
        at = bisect_left(running, target)
        nearest = min((i for i in (at - 1, at) if 0 <= i < len(sizes)), key=lambda i: (abs(running[i] - target), i))
        bounds.append(min(max(nearest + 1, bounds[-1] + 1), len(sizes) - (n - g)))
    bounds.append(len(sizes))
    return [range(a, b) for a, b in zip(bounds, bounds[1:])]


def _activations(shape: ModelShape, job: Job, dtype_bytes: int, from_layer: int = 0) -> int:
    """Tensors kept for the backward pass of one micro-batch, whose backward stops at `from_layer`."""
    tokens = job.micro_batch * job.seq_len
    h, i = shape.hidden, shape.intermediate
    # per token and layer: two norms' inputs and outputs (4h), q/k/v after rotary and the attention output
    # (2 q_dim + 2 kv_dim), o_proj's input (h), attention log-sum-exp (heads), gate, up, act(gate), product (4i)
    per_layer = 5 * h + 2 * shape.q_dim + 2 * shape.kv_dim + shape.heads + 4 * i
    kept = shape.layers - from_layer
    layers = (kept * h + per_layer) if job.gradient_checkpointing else kept * per_layer
    logits = 2 * shape.vocab * 4  # fp32 logits and their gradient
    return tokens * (layers * dtype_bytes + logits)


def targets(shape: ModelShape, job: Job) -> tuple[tuple[int, int], ...]:
    if job.targets is not None:
        return job.targets
    return tuple((size, layer) for layer in range(shape.layers) for size in shape.layer_linears().values())


def salience_groups(shape: ModelShape, job: Job) -> list[tuple[int, int]]:
    """(targeted elements, lowest decoder layer its backward reaches) of each group of the salience pass."""
    weights = targets(shape, job)
    return [(sum(weights[i][0] for i in run), min(weights[i][1] for i in run))
            for run in contiguous_groups([size for size, _ in weights], job.salience_chunks)]


def salience_time(shape: ModelShape, job: Job) -> float:
    """The salience pass's compute relative to one pass: each group runs the whole forward and the backward
    down to its lowest layer (a backward costs about two forwards, three with recomputation)."""
    if ACCUMULATOR_SETS[job.metric] == 0:
        return 1.0
    backward = 3 if job.gradient_checkpointing else 2
    return sum(1 + backward * (shape.layers - lowest) / shape.layers
               for _, lowest in salience_groups(shape, job)) / (1 + backward)


def plan(shape: ModelShape, job: Job) -> dict[str, dict[str, int]]:
    """Per-rank bytes of each part, for the load, the salience pass and training, plus each phase's peak
    (on the accelerator; offloaded parts are counted under 'salience host' and 'training host'). The
    salience figures are those of its largest group."""
    n, c = job.world_size, (2 if job.bf16 else 4)
    k = int(job.density * sum(size for size, _ in targets(shape, job)))
    if job.quantize:
        base_whole = int(shape.targeted * _QUANT_BYTES[job.quantize]) + shape.unquantized * c
    else:
        base_whole = shape.total * c
    base_shard = -(-base_whole // n)
    prefetch = job.prefetch_elements if job.prefetch_elements is not None else auto_prefetch_bucket_size(shape.hidden)
    # ZeRO-3 keeps gathered weights it expects to reuse, up to max_live_elements, beyond the one in use.
    # On one rank whose shards live on the device, a "gathered" weight is a view of its shard: no copy.
    gathered = 0
    if n > 1 or job.offload_param:
        gathered = (max(shape.largest_module, min(job.max_live_elements, shape.total)) + prefetch) * c
    largest_linear = max(shape.layer_linears().values())
    device_base = 0 if job.offload_param else base_shard

    def salience_group(elements: int, lowest_layer: int) -> tuple[dict, dict]:
        # Accumulators, then (each freed as its weight is scored) the scores; the selected entries of the
        # groups before stay beside them.
        kept = {f"salience {'accumulators' if ACCUMULATOR_SETS[job.metric] else 'scores'} (fp32, one group)":
                max(ACCUMULATOR_SETS[job.metric], 1) * -(-elements // n) * 4,
                "selected entries (score + position)": -(-k // n) * _CANDIDATE_BYTES}
        device = {
            "base weight shard": device_base,
            "gathered layer + prefetch": gathered,
            **({} if job.salience_offload else kept),
            # one layer's, formed while the layer after it is reduce-scattered
            "two layers' dense dW (fp32)": 2 * largest_linear * 4 if ACCUMULATOR_SETS[job.metric] else 0,
            "activations": _activations(shape, job, c, lowest_layer) if ACCUMULATOR_SETS[job.metric] else 0,
        }
        host = {"offloaded base shard": base_shard if job.offload_param else 0,
                **(kept if job.salience_offload else {})}
        return device, host

    salience, salience_host = max((salience_group(*group) for group in salience_groups(shape, job)),
                                  key=lambda parts: sum(parts[0].values()))
    values = -(-k // n)
    optimizer = values * (4 + 8)  # fp32 master copy + AdamW's two moments
    training = {
        "base weight shard": device_base,
        "gathered layer + prefetch": gathered,
        "delta values + grads": values * c * 2,
        "indices (int32, partitioned)": values * 4,
        "per-entry scales (fp32, partitioned)": values * 4 if job.delta_scaling else 0,
        # The delta layer builds W + D for one matmul; --delta_impl dense (the accelerator default) also
        # forms that layer's dense dW for the value gradients.
        "one layer's W + D and dW (transient)": largest_linear * c * 2,
        "optimizer states": 0 if job.offload_optimizer else optimizer,
        "activations": _activations(shape, job, c),
    }
    training_host = {"offloaded base shard": base_shard if job.offload_param else 0,
                     "offloaded optimizer states": optimizer if job.offload_optimizer else 0}
    # Host memory while saving, one module at a time (at the density's share of the largest weight; a global
    # top-k may give one weight more). A checkpoint streams this rank's slices straight from the optimizer's
    # partitions, one tensor's bytes at a time (copied to the host, then to bytes); the adapter gathers one
    # module's indices (int64) and values, on every rank.
    module_k = int(job.density * largest_linear)
    saves_host = {"checkpoint: one slice at a time": 2 * -(-module_k // n) * 4,
                  "adapter: one module gathered": module_k * (8 + 4)}
    # transformers cannot load a quantized model inside zero.Init: each rank holds it whole first.
    load = {"whole quantized base" if job.quantize else "base weight shard": base_whole if job.quantize else device_base}
    result = {"load": load, "salience": salience, "salience host": salience_host, "training": training,
              "training host": training_host, "saves host": saves_host}
    return {phase: {**parts, "peak": sum(parts.values())} for phase, parts in result.items()}


def checkpoint_bytes(shape: ModelShape, job: Job) -> int:
    """A checkpoint on disk, all ranks together: each trained value once, with its AdamW moments and its
    int32 index (RNG states and headers aside)."""
    return int(job.density * sum(size for size, _ in targets(shape, job))) * (4 + 8 + 4)


class NoSaliencePlanFits(ValueError):
    """No number of groups, with or without offload, brings the salience pass under the budget."""

    def __init__(self, least_job: Job, least_bytes: int):
        super().__init__(f"the salience pass needs at least {least_bytes} bytes per rank")
        self.least_job, self.least_bytes = least_job, least_bytes


# The share of a memory budget a plan may fill: the planner counted 0.91-0.99 of the peaks measured on CPU
# (docs/plan_check.md, docs/salience_memory.md), and an accelerator's allocator and context need room too.
PLANNING_HEADROOM = 0.9


def choose_salience(shape: ModelShape, job: Job, max_device_bytes: float, max_host_bytes: float,
                    chunks: int | None, offload: bool | None, shared_memory: bool = False,
                    headroom: float = PLANNING_HEADROOM) -> Job:
    """The job with the fewest salience groups (`chunks` if fixed) whose planned salience peak fits
    `headroom` x `max_device_bytes`; at equal groups without offload first, then with it (`offload` if
    fixed) where the host part fits `headroom` x `max_host_bytes`. `shared_memory`: the device is the host
    (CPU), one budget for both parts. Only grasp's Hessian needs every weight at once: one group."""
    most = 1 if job.metric == "grasp" else len(targets(shape, job))
    tried = []
    for groups in ([chunks] if chunks else range(1, most + 1)):
        for offloaded in ([offload] if offload is not None else [False, True]):
            candidate = replace(job, salience_chunks=groups, salience_offload=offloaded)
            planned = plan(shape, candidate)
            device, host = planned["salience"]["peak"], planned["salience host"]["peak"]
            if shared_memory:
                device, host = device + host, 0
            if device <= headroom * max_device_bytes and host <= headroom * max_host_bytes:
                return candidate
            tried.append((device, candidate))
    least, least_job = min(tried, key=lambda t: t[0])
    raise NoSaliencePlanFits(least_job, least)
