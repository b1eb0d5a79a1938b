"""Per-rank memory of a speft-ds job, before you launch it (for the salience pass and for training).

    speft-plan --model llama-70b --world_size 64 --density 0.01 --quantize nf4 \\
        --ds_config ds_configs/z3_cluster.json --seq_len 2048 --micro_batch 1 [--max_memory_gib 80]

With --max_memory_gib (or a fixed --salience_chunks / --salience_offload) it also chooses how the salience
pass fits: the fewest groups of targeted weights, with or without accumulators in host memory.
"""

from dataclasses import replace
from pathlib import Path

from speft_ds.cli import Parser
from speft_ds.config import METRIC_NAMES, SHIPPED_DS_CONFIG, ConfigError, read_json
from speft_ds.models.gguf import resolve_model
from speft_ds.runtime.ds_config import read_ds_config
from speft_ds.runtime.memory_plan import (PLANNING_HEADROOM, PRESETS, Job, ModelShape, NoSaliencePlanFits,
                                          checkpoint_bytes, choose_salience, plan, salience_time, zero_settings)

GIB = 2**30


def _shape(model: str) -> ModelShape:
    if model in PRESETS:
        return ModelShape.from_config(PRESETS[model])
    path = Path(resolve_model(model))
    path = path / "config.json" if path.is_dir() else path
    if not path.is_file():
        raise ConfigError(f"--model {model} is neither a preset ({', '.join(PRESETS)}) nor a config.json")
    try:
        return ModelShape.from_config(read_json(str(path), "--model"))
    except KeyError as err:
        raise ConfigError(f"--model {model}: its config has no {err}: pass a LLaMA-family config") from None


def _salience_job(shape: ModelShape, job: Job, args) -> Job:
    """The job with its salience plan: as given, or the fewest groups that fit --max_memory_gib."""
    chunks = None if args.salience_chunks == "auto" else int(args.salience_chunks)
    offload = None if args.salience_offload == "auto" else args.salience_offload == "cpu"
    if args.max_memory_gib is None:  # no budget: one group and no offload unless asked for
        return replace(job, salience_chunks=chunks or 1, salience_offload=bool(offload))
    host = (args.max_host_memory_gib or float("inf")) * GIB
    try:
        return choose_salience(shape, job, args.max_memory_gib * GIB, host, chunks, offload)
    except NoSaliencePlanFits as err:
        raise ConfigError(f"the salience pass needs {err.least_bytes / GIB:.2f} GiB per rank even in "
                          f"{err.least_job.salience_chunks} groups, over {PLANNING_HEADROOM:.0%} of --max_memory_gib "
                          f"{args.max_memory_gib}") from None


def main(argv) -> int:
    parser = Parser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help=f"{', '.join(PRESETS)}, or a config.json, model directory or .gguf file")
    parser.add_argument("--world_size", type=int, required=True, help="Ranks (GPUs) in the job.")
    parser.add_argument("--density", type=float, default=0.01)
    parser.add_argument("--quantize", choices=("nf4", "fp4", "int8"), default=None)
    parser.add_argument("--ds_config", default=str(SHIPPED_DS_CONFIG))
    parser.add_argument("--seq_len", type=int, default=2048)
    parser.add_argument("--micro_batch", type=int, default=1)
    parser.add_argument("--gradient_checkpointing", action="store_true")
    parser.add_argument("--fp32", action="store_true", help="Count fp32 weights (CPU runs) instead of bf16.")
    parser.add_argument("--metric", choices=METRIC_NAMES, default="gradient")
    parser.add_argument("--max_memory_gib", type=float, default=None,
                        help="Accelerator memory per rank: choose the salience groups and offload that fit it.")
    parser.add_argument("--max_host_memory_gib", type=float, default=None,
                        help="Host memory per rank offloaded salience accumulators may use (default: unbounded).")
    parser.add_argument("--salience_chunks", default="auto", help="Groups of targeted weights (auto: chosen).")
    parser.add_argument("--salience_offload", choices=("auto", "none", "cpu"), default="auto")
    args = parser.parse_args(argv)
    if args.world_size < 1 or args.seq_len < 1 or args.micro_batch < 1 or not 0 < args.density <= 1:
        raise ConfigError("--world_size, --seq_len and --micro_batch must be >= 1 and --density in (0, 1]")
    shape = _shape(args.model)
    if args.salience_chunks != "auto" and not (args.salience_chunks.isdigit()
                                               and 1 <= int(args.salience_chunks) <= 7 * shape.layers):
        raise ConfigError(f"--salience_chunks {args.salience_chunks} is neither auto nor a number of groups from 1 to "
                          f"{7 * shape.layers}")
    zero = read_ds_config(args.ds_config)["zero_optimization"]
    job = Job(world_size=args.world_size, density=args.density, seq_len=args.seq_len, micro_batch=args.micro_batch,
              bf16=not args.fp32, quantize=args.quantize, gradient_checkpointing=args.gradient_checkpointing,
              metric=args.metric, **zero_settings(zero))
    job = _salience_job(shape, job, args)
    print(f"{args.model}: {shape.total / 1e9:.2f}B parameters, {shape.targeted / 1e9:.2f}B targeted, "
          f"k = {int(args.density * shape.targeted):,}; {args.world_size} ranks")
    for phase, parts in plan(shape, job).items():
        if parts["peak"] == 0:
            continue
        print(f"\n{phase} (per rank)")
        if phase == "salience":
            print(f"  {job.salience_chunks} group{'s' if job.salience_chunks > 1 else ''} of targeted weights, "
                  f"accumulators {'in host memory' if job.salience_offload else 'on the accelerator'}; "
                  f"about {salience_time(shape, job):.2f}x the compute of one pass")
        for name, value in parts.items():
            print(f"  {name:38} {value / GIB:9.2f} GiB")
    print(f"\ncheckpoint on disk (all ranks): {checkpoint_bytes(shape, job) / GIB:.2f} GiB")
    return 0
