"""How the salience pass fits a memory budget: in how many groups of targeted weights it scores them, and
whether their accumulators live in host memory. Chosen with the memory planner before the model loads."""

from __future__ import annotations

from dataclasses import dataclass, replace

import psutil

from ...config import ConfigError, TrainConfig
from ...models.loading import block_of, decoder_blocks
from ...runtime.launch_env import local_size_from_env
from ...runtime.memory_plan import (PLANNING_HEADROOM, Job, ModelShape, NoSaliencePlanFits, choose_salience,
                                    contiguous_groups, plan, salience_time, zero_settings)

GIB = 2**30


@dataclass(frozen=True)
class SaliencePlan:
    groups: list[list[str]]   # targeted weight names per pass, in model order
    offload: bool             # accumulators in host memory
    planned_peak: int         # bytes per rank on the accelerator (on CPU: everything, host memory being both)
    planned_host: int         # bytes per rank of host memory the offload adds (0 on CPU)
    budget: int               # the --max_memory_gib it was planned against, in bytes
    time_factor: float        # the planned compute relative to one pass over all weights

    def describe(self) -> str:
        where = "host memory" if self.offload else "the accelerator"
        return (f"salience in {len(self.groups)} group{'s' if len(self.groups) > 1 else ''} of targeted weights, "
                f"accumulators on {where}: planned peak {self.planned_peak / GIB:.2f} GiB per rank "
                f"(budget {self.budget / GIB:.2f} GiB), about {self.time_factor:.2f}x the compute of one pass")

    def record(self) -> dict:
        return {"event": "salience_plan", "chunks": len(self.groups), "offload": self.offload,
                "planned_peak_gib": self.planned_peak / GIB, "planned_host_gib": self.planned_host / GIB,
                "max_memory_gib": self.budget / GIB, "time_factor": self.time_factor}


def free_host_bytes_per_rank() -> float:
    return psutil.virtual_memory().available / local_size_from_env()


def plan_salience(config: TrainConfig, model_config, skeleton, target_shapes: dict[str, tuple[int, int]], k: int,
                  ds_config: dict, world_size: int, bf16: bool, accelerator) -> SaliencePlan:
    """The fewest groups (or --salience_chunks) and, off CPU, the offload choice whose planned salience peak
    fits 90% of --max_memory_gib, with offloaded accumulators within 90% of --max_host_memory_gib
    (memory_plan.PLANNING_HEADROOM). On CPU the host is the accelerator: both parts count against one
    budget, and offload is never chosen for it."""
    try:
        shape = ModelShape.from_config(model_config.to_dict())
    except KeyError as err:
        raise ConfigError(f"--model {config.model}: the memory planner needs a LLaMA-family config (no {err})") from None
    blocks = list(decoder_blocks(skeleton))
    # The decoder layer where each weight's backward starts: its block's, or the first for weights outside blocks.
    layers = [blocks.index(block_of(name, blocks)) if block_of(name, blocks) else 0 for name in target_shapes]
    sizes = [rows * cols for rows, cols in target_shapes.values()]
    chunks, offload = config.fixed_salience_chunks, config.fixed_salience_offload
    if chunks is not None and chunks > len(sizes):
        raise ConfigError(f"--salience_chunks {chunks} is more than the {len(sizes)} targeted weights: pass at most "
                          f"{len(sizes)}")
    on_cpu = accelerator.device_name() == "cpu"
    job = Job(world_size=world_size, density=k / sum(sizes), seq_len=config.seq_len,
              micro_batch=config.micro_batch_size, bf16=bf16, quantize=config.quantize,
              gradient_checkpointing=config.gradient_checkpointing, metric=config.metric,
              delta_scaling=config.delta_scaling != "none",
              targets=tuple(zip(sizes, layers)), **zero_settings(ds_config["zero_optimization"]))
    budget = config.max_memory_gib * GIB if config.max_memory_gib else (
        free_host_bytes_per_rank() if on_cpu else accelerator.total_memory())
    host = config.max_host_memory_gib * GIB if config.max_host_memory_gib else free_host_bytes_per_rank()
    if on_cpu and offload is None:
        offload = False  # host memory is the only memory: moving accumulators there saves nothing
    if chunks is not None and offload is not None:
        job = replace(job, salience_chunks=chunks, salience_offload=offload)
    else:
        try:
            job = choose_salience(shape, job, budget, host, chunks, offload, shared_memory=on_cpu)
        except NoSaliencePlanFits as err:
            n = err.least_job.salience_chunks
            raise ConfigError(f"the salience pass needs {err.least_bytes / GIB:.2f} GiB per rank even in {n} "
                              f"group{'s' if n > 1 else ''}, over {PLANNING_HEADROOM:.0%} of the budget of "
                              f"{budget / GIB:.2f} GiB (--max_memory_gib): raise it, add ranks, pass "
                              "--gradient_checkpointing or a smaller --micro_batch_size") from None
    planned = plan(shape, job)
    device, offloaded = planned["salience"]["peak"], planned["salience host"]["peak"]
    names = list(target_shapes)
    return SaliencePlan([[names[i] for i in run] for run in contiguous_groups(sizes, job.salience_chunks)],
                        job.salience_offload, device + offloaded if on_cpu else device, 0 if on_cpu else offloaded,
                        int(budget), salience_time(shape, job))
