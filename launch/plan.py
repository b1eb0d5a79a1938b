"""Per-rank memory of a speft-ds job, before you launch it (for the salience pass and for training).

    python launch/plan.py --model llama-70b --world_size 64 --density 0.01 --quantize nf4 \\
        --ds_config ds_configs/z3_cluster.json --seq_len 2048 --micro_batch 1
"""

import os
import sys

# launch/inspect.py shares its name with the standard library's `inspect` (which torch imports): keep this
# folder off the import path.
sys.path = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

from pathlib import Path

from speft_ds.cli import Parser, run_main
from speft_ds.config import SHIPPED_DS_CONFIG, ConfigError, read_json
from speft_ds.ds_config import read_ds_config
from speft_ds.memory_plan import PRESETS, Job, ModelShape, plan


def _shape(model: str) -> ModelShape:
    if model in PRESETS:
        return ModelShape.from_config(PRESETS[model])
    path = Path(model)
    path = path / "config.json" if path.is_dir() else path
    if not path.is_file():
        raise ConfigError(f"--model {model} is neither a preset ({', '.join(PRESETS)}) nor a config.json")
    try:
        return ModelShape.from_config(read_json(str(path), "--model"))
    except KeyError as err:
        raise ConfigError(f"--model {model}: its config has no {err}: pass a LLaMA-family config") from None


def main(argv) -> int:
    parser = Parser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help=f"{', '.join(PRESETS)}, or a config.json / model directory")
    parser.add_argument("--world_size", type=int, required=True, help="Ranks (GPUs) in the job.")
    parser.add_argument("--density", type=float, default=0.01)
    parser.add_argument("--quantize", choices=("nf4", "fp4", "int8"), default=None)
    parser.add_argument("--ds_config", default=str(SHIPPED_DS_CONFIG))
    parser.add_argument("--seq_len", type=int, default=2048)
    parser.add_argument("--micro_batch", type=int, default=1)
    parser.add_argument("--gradient_checkpointing", action="store_true")
    parser.add_argument("--fp32", action="store_true", help="Count fp32 weights (CPU runs) instead of bf16.")
    args = parser.parse_args(argv)
    if args.world_size < 1 or args.seq_len < 1 or args.micro_batch < 1 or not 0 < args.density <= 1:
        raise ConfigError("--world_size, --seq_len and --micro_batch must be >= 1 and --density in (0, 1]")
    zero = read_ds_config(args.ds_config)["zero_optimization"]
    prefetch, max_live = (zero.get(key, "auto") for key in ("stage3_prefetch_bucket_size", "stage3_max_live_parameters"))
    job = Job(world_size=args.world_size, density=args.density, seq_len=args.seq_len, micro_batch=args.micro_batch,
              bf16=not args.fp32, quantize=args.quantize, gradient_checkpointing=args.gradient_checkpointing,
              offload_param=zero.get("offload_param", {}).get("device") == "cpu",
              offload_optimizer=zero.get("offload_optimizer", {}).get("device") == "cpu",
              prefetch_elements=None if prefetch == "auto" else int(prefetch),
              max_live_elements=int(1e9) if max_live == "auto" else int(max_live))  # DeepSpeed's default
    shape = _shape(args.model)
    print(f"{args.model}: {shape.total / 1e9:.2f}B parameters, {shape.targeted / 1e9:.2f}B targeted, "
          f"k = {int(args.density * shape.targeted):,}; {args.world_size} ranks")
    for phase, parts in plan(shape, job).items():
        if parts["peak"] == 0:
            continue
        print(f"\n{phase} (per rank)")
        for name, value in parts.items():
            print(f"  {name:34} {value / 2**30:9.2f} GiB")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
