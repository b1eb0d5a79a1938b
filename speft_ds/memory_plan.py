"""Per-rank memory of a speft-ds job, before it is launched: for the salience pass and for training.

Everything is counted from the model's shape and the job's settings, in bytes per rank, with no fitted
constant: what each tensor holds times its element size. Activations count the tensors a LLaMA decoder
layer keeps for its backward pass (with SDPA attention, no dropout); they are an estimate of what
autograd saves, the rest is the layout speft-ds and ZeRO-3 use.
"""

from __future__ import annotations

from dataclasses import dataclass

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

    @classmethod
    def from_config(cls, config: dict) -> "ModelShape":
        return cls(config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"],
                   config["num_attention_heads"], config.get("num_key_value_heads") or config["num_attention_heads"],
                   config["vocab_size"], bool(config.get("tie_word_embeddings", False)))

    @property
    def kv_dim(self) -> int:
        return self.hidden // self.heads * self.kv_heads

    def layer_linears(self) -> dict[str, int]:
        """Elements of each linear weight of one decoder layer (the default targets)."""
        h, i = self.hidden, self.intermediate
        return {"q_proj": h * h, "k_proj": h * self.kv_dim, "v_proj": h * self.kv_dim, "o_proj": h * h,
                "gate_proj": h * i, "up_proj": h * i, "down_proj": h * i}

    @property
    def targeted(self) -> int:
        return self.layers * sum(self.layer_linears().values())

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


@dataclass(frozen=True)
class Job:
    world_size: int
    density: float
    seq_len: int
    micro_batch: int
    bf16: bool = True
    quantize: str | None = None
    gradient_checkpointing: bool = False
    offload_param: bool = False
    offload_optimizer: bool = False
    prefetch_elements: int | None = None  # stage3_prefetch_bucket_size; None: "auto"
    max_live_elements: int = int(1e9)     # stage3_max_live_parameters: gathered weights ZeRO-3 may keep


def _activations(shape: ModelShape, job: Job, dtype_bytes: int) -> int:
    """Tensors kept for the backward pass of one micro-batch."""
    tokens = job.micro_batch * job.seq_len
    h, i = shape.hidden, shape.intermediate
    # per token and layer: two norms' inputs and outputs (4h), q/k/v after rotary and the attention output
    # (2h + 2 kv_dim), o_proj's input (h), attention log-sum-exp (heads), gate, up, act(gate), product (4i)
    per_layer = 7 * h + 2 * shape.kv_dim + shape.heads + 4 * i
    layers = (shape.layers * h + per_layer) if job.gradient_checkpointing else shape.layers * per_layer
    logits = 2 * shape.vocab * 4  # fp32 logits and their gradient
    return tokens * (layers * dtype_bytes + logits)


def plan(shape: ModelShape, job: Job) -> dict[str, dict[str, int]]:
    """Per-rank bytes of each part, for the load, the salience pass and training, plus each phase's peak
    (on the accelerator; offloaded parts are counted under 'host')."""
    n, c = job.world_size, (2 if job.bf16 else 4)
    k = int(job.density * shape.targeted)
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
    activations = _activations(shape, job, c)
    largest_linear = max(shape.layer_linears().values())

    device_base = 0 if job.offload_param else base_shard
    salience = {
        "base weight shard": device_base,
        "gathered layer + prefetch": gathered,
        "salience accumulators (fp32)": -(-shape.targeted // n) * 4,
        # one layer's, formed while the layer after it is reduce-scattered
        "two layers' dense dW (fp32)": 2 * largest_linear * 4,
        "activations": activations,
    }
    values = -(-k // n)
    optimizer = values * (4 + 8)  # fp32 master copy + AdamW's two moments
    training = {
        "base weight shard": device_base,
        "gathered layer + prefetch": gathered,
        "delta values + grads": values * c * 2,
        "indices (int32, partitioned)": values * 4,
        # The delta layer builds W + D for one matmul; --delta_impl dense (the accelerator default) also
        # forms that layer's dense dW for the value gradients.
        "one layer's W + D and dW (transient)": largest_linear * c * 2,
        "optimizer states": 0 if job.offload_optimizer else optimizer,
        "activations": activations,
    }
    host = {"offloaded base shard": base_shard if job.offload_param else 0,
            "offloaded optimizer states": optimizer if job.offload_optimizer else 0}
    # transformers cannot load a quantized model inside zero.Init: each rank holds it whole first.
    load = {"whole quantized base" if job.quantize else "base weight shard": base_whole if job.quantize else device_base}
    result = {"load": load, "salience": salience, "training": training, "host": host}
    return {phase: {**parts, "peak": sum(parts.values())} for phase, parts in result.items()}
