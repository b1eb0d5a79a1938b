"""The evaluate tool: a base model, with or without an adapter (unmerged), or a merged directory, scored on a
task file (speft_ds.data.task_eval). One process loads the model whole; under a launcher with several ranks it
is loaded under ZeRO-3, each rank holding its partition, and the examples are split across the ranks."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from ..cli import Parser
from ..config import SHIPPED_DS_CONFIG, ConfigError
from ..data.task_eval import DEFAULT_MAX_NEW_TOKENS, TaskResult, load_task
from ..models.gguf import resolve_model
from ..runtime.launch_env import world_size_from_env


def _parser() -> Parser:
    parser = Parser(prog="evaluate.py", description="Task accuracy of a model, with or without a speft-ds adapter.")
    parser.add_argument("--model", required=True, help="HF model directory (base or merged) or a .gguf file.")
    parser.add_argument("--adapter", default=None,
                        help="Adapter directory to apply, unmerged (SPEFT, or LoRA in PEFT's format).")
    parser.add_argument("--task", required=True, help="Task .jsonl: prompt + answer (generation) or prompt + choices "
                                                      "+ label (multiple choice).")
    parser.add_argument("--output", default=None, help="Write the result (with every prediction) to this JSON file "
                                                       "(refused where it exists, unless --overwrite).")
    parser.add_argument("--overwrite", action="store_true", help="Replace an existing --output file.")
    parser.add_argument("--max_new_tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS)
    parser.add_argument("--ds_config", default=str(SHIPPED_DS_CONFIG), help="ZeRO-3 config, for several ranks.")
    parser.add_argument("--trust_remote_code", action="store_true")
    parser.add_argument("--local_rank", type=int, default=-1, help="Set by the DeepSpeed launcher.")
    return parser


def describe(result: TaskResult) -> str:
    line = f"{result.task}: accuracy {result.accuracy:.1%} ± {result.stderr:.1%} ({result.examples} examples"
    if result.accuracy_norm is not None:
        line += f"; length-normalised {result.accuracy_norm:.1%} ± {result.stderr_norm:.1%}"
    if result.ended_with_eos is not None:
        line += f"; {result.ended_with_eos:.0%} ended with EOS"
    return line + ")"


def _load_plain(model_dir: str, adapter: str | None, trust_remote_code: bool):
    import torch
    from transformers import AutoModelForCausalLM

    from ..methods.adapters import load_adapter

    model = AutoModelForCausalLM.from_pretrained(model_dir, use_safetensors=True, dtype="auto",
                                                 trust_remote_code=trust_remote_code)
    if adapter:
        model = load_adapter(model, adapter)
    return model.to("cuda" if torch.cuda.is_available() else "cpu"), None


def _load_partitioned(model_dir: str, adapter: str | None, ds_path: str, trust_remote_code: bool, world_size: int):
    """Under ZeRO-3: each rank loads its partition; an engine without optimizer gathers weights per layer."""
    import deepspeed
    import torch
    from deepspeed.accelerator import get_accelerator

    from ..config import TrainConfig
    from ..methods.adapters import load_adapter_partitioned
    from ..models.loading import load_model, load_model_config
    from ..runtime.distributed import init_distributed
    from ..runtime.ds_config import fill_auto, read_ds_config, resolve_bf16, salience_ds_config

    init_distributed()
    config = TrainConfig(model=model_dir, ds_config=ds_path, micro_batch_size=1, trust_remote_code=trust_remote_code)
    accelerator = get_accelerator()
    bf16 = resolve_bf16(config, accelerator.device_name(), accelerator.is_bf16_supported())
    ds_config = salience_ds_config(fill_auto(read_ds_config(ds_path), config, world_size=world_size,
                                             hidden_size=load_model_config(config).hidden_size, total_steps=1,
                                             bf16=bf16))
    model, hf_ds_config = load_model(config, ds_config, torch.bfloat16 if bf16 else torch.float32)
    if adapter:
        load_adapter_partitioned(model, adapter, ds_config)
    engine = deepspeed.initialize(model=model, config=ds_config)[0]
    return engine.module, (engine, hf_ds_config)


def main(argv: Sequence[str]) -> int:
    args = _parser().parse_args(list(argv))
    task = load_task(args.task)
    if args.adapter and not Path(args.adapter, "adapter_config.json").is_file():
        raise ConfigError(f"--adapter {args.adapter} is not an adapter directory (no adapter_config.json)")
    if args.max_new_tokens < 1:
        raise ConfigError(f"--max_new_tokens must be >= 1, got {args.max_new_tokens}")
    if args.output and Path(args.output).exists() and not args.overwrite:
        raise ConfigError(f"--output {args.output} exists: pass another file, or --overwrite to replace it")
    model_dir = resolve_model(args.model)
    if not Path(model_dir, "config.json").is_file():
        raise ConfigError(f"--model {args.model} is not a model directory (no config.json) or a .gguf file")

    from transformers import AutoTokenizer

    from ..data.task_eval import evaluate_task

    world_size = world_size_from_env()
    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=args.trust_remote_code)
    if world_size > 1:
        import torch.distributed as dist

        from ..runtime.distributed import leave_process_group, naming_lost_ranks
        from ..runtime.zero3 import destroy_engine

        with naming_lost_ranks():
            model, (engine, _) = _load_partitioned(model_dir, args.adapter, args.ds_config, args.trust_remote_code,
                                                   world_size)
            rank = dist.get_rank()
            result = evaluate_task(model, tokenizer, task, args.max_new_tokens, show_progress=rank == 0)
            destroy_engine(engine)
            leave_process_group()
    else:
        model, _ = _load_plain(model_dir, args.adapter, args.trust_remote_code)
        rank = 0
        result = evaluate_task(model, tokenizer, task, args.max_new_tokens)
    if rank == 0:
        print(describe(result))
        if args.output:
            Path(args.output).parent.mkdir(parents=True, exist_ok=True)
            Path(args.output).write_text(json.dumps({"model": model_dir, "adapter": args.adapter, "task": args.task,
                                                     **result.to_json()}, indent=2) + "\n")
    return 0
