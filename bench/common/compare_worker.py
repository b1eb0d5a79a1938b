"""One method of bench/speed/compare.py, on the ranks the DeepSpeed launcher starts.

Every method goes through speft-ds's own plan (data, ZeRO-3 config, steps), model loading, training
loop and evaluation; only the model's trainable part differs:
  speft     this project's recipe (salience, global top-k, sparse-delta layers);
  lora      the recipe with --peft lora (PEFT's LoRA layers) of rank --lora_r on the same target modules;
  roselora  the recipe with --peft roselora of rank --lora_r;
  full   every parameter trained;
  floor  nothing trained: the frozen model's forward and a backward to its input embeddings per micro-batch,
         no optimizer, the least any method's step can cost (bench/speed/compare.py's ratios to it);
  paper  the reference SPEFT code's layer: W + scatter_add(indices, values) built as a dense weight each
         forward, plain autograd, on the mask of a finished speft run (--mask);
  base   no training: the model as loaded, evaluated (bench/quality/quality.py's baseline row).
Rank 0 writes the run's figures as one JSON object to --result.

    deepspeed --num_gpus 2 bench/common/compare_worker.py --method lora --lora_r 5 --result r.json -- TRAIN FLAGS
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import deepspeed  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from tqdm import tqdm  # noqa: E402

from speft_ds.cli import parse_config  # noqa: E402
from speft_ds.data.batches import collate, model_inputs, pad_token_id  # noqa: E402
from speft_ds.data.losses import causal_lm_loss_sum  # noqa: E402
from speft_ds.methods.speft.adapter_format import read_adapter  # noqa: E402
from speft_ds.models.loading import load_model  # noqa: E402
from speft_ds.recipe import micro_batch_stream, plan_run, run, score_run, train_steps, training_engine  # noqa: E402
from speft_ds.runtime import zero3  # noqa: E402
from speft_ds.runtime.distributed import device, init_distributed, leave_process_group, per_rank  # noqa: E402
from speft_ds.runtime.ds_config import salience_ds_config  # noqa: E402
from speft_ds.runtime.metrics_log import MetricsLog, log_memory  # noqa: E402
from speft_ds.runtime.run_summary import PHASES  # noqa: E402


class PaperSparseLinear(nn.Module):
    """The reference code's sparse linear: a dense W + scatter_add(indices, values) every forward, whose
    autograd keeps that dense weight for the backward pass. Owns the base weight so ZeRO-3 gathers it here."""

    def __init__(self, base: nn.Linear, indices: torch.Tensor):
        super().__init__()
        self.weight, self.bias = base.weight, base.bias
        self.register_buffer("indices", indices, persistent=False)
        self.values = nn.Parameter(torch.zeros(indices.numel()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        delta = torch.zeros(self.weight.numel(), dtype=self.weight.dtype, device=self.weight.device)
        delta = delta.scatter_add(0, self.indices, self.values.to(self.weight.dtype))
        return F.linear(x, self.weight + delta.view_as(self.weight), self.bias)


def _paper_layers(model: nn.Module, plan, mask: Path) -> list:
    indices, _, _ = read_adapter(mask)
    params = []
    with zero3.partitioned_init(plan.ds_config):
        for name, idx in indices.items():
            parent_name, _, child = name.rpartition(".")
            layer = PaperSparseLinear(model.get_submodule(name), idx)
            setattr(model.get_submodule(parent_name), child, layer)
            params.append(layer.values)
    return params


def _full(model: nn.Module) -> list:
    return list(model.requires_grad_(True).parameters())


def _floor_steps(engine, plan, log: MetricsLog, progress: tqdm) -> None:
    """The training loop's forward and backward with nothing to train: the backward runs to the input
    embeddings (made to need a gradient), so every layer's input gradient is computed, no weight's."""
    config, model = plan.config, engine.module
    hook = model.get_input_embeddings().register_forward_hook(lambda module, inputs, out: out.requires_grad_(True))
    stream = micro_batch_stream(plan, dist.get_rank(), dist.get_world_size())
    pad_id = pad_token_id(plan.tokenizer)
    for step in range(1, plan.total_steps + 1):
        started, step_loss = time.perf_counter(), 0.0
        for _ in range(config.gradient_accumulation_steps):
            batch = {key: value.to(device()) for key, value in collate([plan.train_set[i] for i in next(stream)],
                                                                       pad_id).items()}
            loss_sum, tokens = causal_lm_loss_sum(model(**model_inputs(batch), use_cache=False).logits, batch["labels"])
            loss = loss_sum / max(tokens, 1)
            loss.backward()
            step_loss += loss.item() / config.gradient_accumulation_steps
        log.write({"step": step, "loss": step_loss, "step_time_s": time.perf_counter() - started})
        progress.update()
    hook.remove()


def _train_other(args, plan) -> tuple[object, Path]:
    """The recipe's load / train / eval (task accuracy and retention before and after where asked) for a
    model whose trainable part is none of the recipe's methods; `base` evaluates the model as loaded. No
    method here can switch its update off, so retention has no KL."""
    config = plan.config
    init_distributed(config.ddp_timeout)
    rank, world_size = dist.get_rank(), dist.get_world_size()
    log = MetricsLog(Path(config.output_dir) / "metrics.jsonl", enabled=rank == 0)
    log_memory(log, "start")
    started = time.perf_counter()
    model, hf_ds_config = load_model(config, plan.ds_config, torch.bfloat16 if plan.bf16 else torch.float32)
    log.write({"event": "load", "wall_time_s": time.perf_counter() - started})
    log_memory(log, "load")
    if args.method in ("base", "floor"):  # no optimizer: the engine gathers weights around each module
        engine = deepspeed.initialize(model=model, config=salience_ds_config(plan.ds_config))[0]
    else:
        params = {"full": lambda: _full(model), "paper": lambda: _paper_layers(model, plan, Path(args.mask))}[args.method]()
        engine = training_engine(model, params, plan, completed_steps=0)
    trains = args.method in ("full", "paper")
    if config.eval_on_start and trains:  # untrained, the base scores once: after
        score_run(engine, plan, log, 0, "before", None)
    if args.method != "base":
        started = time.perf_counter()
        with tqdm(total=plan.total_steps, desc="train", disable=rank != 0) as progress:
            if trains:
                train_steps(engine, plan, micro_batch_stream(plan, rank, world_size), range(1, plan.total_steps + 1),
                            log, progress, after_step=lambda step: None)
            else:
                _floor_steps(engine, plan, log, progress)
        log.write({"event": "training", "steps": plan.total_steps, "wall_time_s": time.perf_counter() - started})
        log_memory(log, "training")
    score_run(engine, plan, log, plan.total_steps, "after", None)
    log_memory(log, "eval")
    del hf_ds_config
    return engine, Path(config.output_dir) / "metrics.jsonl"


def k_shares(adapter: Path) -> dict[str, dict[str, float]]:
    """The share of k each module type (q_proj, ...) and each decoder layer received, and their shares of
    the targeted weights' elements (what an even spread would give them), from an adapter file."""
    indices, _, adapter_config = read_adapter(adapter)
    counts = {name: idx.numel() for name, idx in indices.items()}
    sizes = {name: rows * cols for name, (rows, cols) in adapter_config["shapes"].items()}
    k, total = sum(counts.values()), sum(sizes.values())
    shares = {f"{kind}_share_by_{by}": {} for kind in ("k", "weight") for by in ("module", "layer")}
    for name, count in counts.items():
        layer = re.search(r"\.layers\.(\d+)\.", name)
        for by, group in (("module", name.rsplit(".", 1)[-1]), ("layer", f"layer {layer.group(1)}" if layer else "other")):
            for kind, share in (("k", count / k), ("weight", sizes[name] / total)):
                into = shares[f"{kind}_share_by_{by}"]
                into[group] = into.get(group, 0.0) + share
    return shares


def _side_file(adapter: Path) -> dict:
    """RoseLoRA's final non-zeros and budget, from its adapter's side file."""
    side = adapter / "speft_ds_adapter.json"
    record = json.loads(side.read_text()) if side.is_file() else {}
    return {key: record[key] for key in ("nonzeros", "final_budget") if key in record}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", required=True,
                        choices=("speft", "lora", "roselora", "rosa", "full", "paper", "floor", "base"))
    parser.add_argument("--lora_r", type=int, default=8)
    parser.add_argument("--mask", help="paper: the adapter directory of a speft run whose mask to train")
    parser.add_argument("--warmup_steps_excluded", type=int, default=1)
    parser.add_argument("--memory_cap_gib", type=float, default=None,
                        help="On a GPU: cap this process at this much device memory (torch's memory fraction)")
    parser.add_argument("--result", required=True)
    parser.add_argument("--local_rank", type=int, default=0)  # the DeepSpeed launcher passes it
    args, train_argv = parser.parse_known_args()
    if args.memory_cap_gib and torch.cuda.is_available():  # before anything is allocated on the device
        local = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_per_process_memory_fraction(
            min(1.0, args.memory_cap_gib * 2**30 / torch.cuda.get_device_properties(local).total_memory), local)
    recipe_method = args.method in ("speft", "lora", "roselora", "rosa")
    peft_flags = ["--peft", args.method] if recipe_method else []
    peft_flags += ["--lora_r", str(args.lora_r)] if args.method in ("lora", "roselora", "rosa") else []
    config, explicit = parse_config([a for a in train_argv if a != "--"] + peft_flags)
    plan = plan_run(config, explicit)
    started = time.perf_counter()
    if recipe_method:
        engine = run(plan).engine
        metrics = Path(config.output_dir) / "metrics.jsonl"
    else:
        engine, metrics = _train_other(args, plan)
    trainable = sum(zero3.resident_bytes(p) for p in engine.module.parameters() if p.requires_grad)
    trainable_numel = sum(zero3.full_numel(p) for p in engine.module.parameters() if p.requires_grad)
    held = per_rank([trainable, 0 if args.method in ("base", "floor") else zero3.optimizer_bytes(engine)])
    if dist.get_rank() == 0:
        records = [json.loads(line) for line in metrics.read_text().splitlines()]
        events = {r["event"]: r for r in records if "event" in r and r["event"] != "memory"}
        memory = {r["phase"]: r for r in records if r.get("event") == "memory"}
        trained = memory.get("training", memory["load"])
        step_times = [r["step_time_s"] for r in records if "event" not in r][args.warmup_steps_excluded:]
        tasks = {f"task_{r['when']}": r for r in records if r.get("event") == "task_eval"}
        retention = {f"retention_{r['when']}": r for r in records if r.get("event") == "retention"}
        # every phase's wall time (mask updates and scoring points add up), and each rank's peak over the job
        phases = {name: sum(r["wall_time_s"] for r in records if r.get("event") == event) for name, event in PHASES}
        job_peak = [max(peaks) for peaks in zip(*(r["peak_rss_mib_per_rank"] for r in memory.values()))]
        adapter = Path(config.output_dir) / "adapter"
        Path(args.result).write_text(json.dumps({
            "method": args.method, "world_size": dist.get_world_size(), "trainable": trainable_numel,
            "median_step_s": statistics.median(step_times) if step_times else None, "step_times_s": step_times,
            "peak_rss_mib_per_rank": trained["peak_rss_mib_per_rank"],
            "device_peak_mib_per_rank": trained.get("device_peak_mib_per_rank"),  # on an accelerator only
            **tasks, **retention, "phase_s": phases, "job_peak_rss_mib_per_rank": job_peak,
            "memory": list(memory.values()),
            **(k_shares(adapter) if args.method == "speft" else {}), **_side_file(adapter),
            "trainable_bytes_per_rank": [int(r[0]) for r in held], "optimizer_bytes_per_rank": [int(r[1]) for r in held],
            "eval_loss": events["eval"]["eval_loss"],
            "salience_s": events.get("salience", {}).get("wall_time_s"),
            "selection_s": events.get("selection", {}).get("wall_time_s"),
            "wall_s": time.perf_counter() - started}, indent=2) + "\n")
    zero3.destroy_engine(engine)
    leave_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
