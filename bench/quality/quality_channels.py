"""Where a SPEFT mask sits against the input channels' activation norms: the share of k on each targeted
linear's top 1% and top 10% of input channels, ranked by the L2 norm of that channel's input over the
retention text (what an even spread gives: 1% and 10%). A gradient score |dY^T X| grows with the input's
magnitude, so a mask crowded onto loud channels changes what every token sees.

    python bench/quality/quality_channels.py          # every SPEFT cell of bench/quality/quality.py whose adapter is here
    python bench/quality/quality_channels.py --ablate speft-arith-b0.86%-lr0.003-s1-n60

--ablate asks whether the loud channels cause the forgetting: it scores one cell's adapter whole, without
its entries on each layer's top 1% of input channels, and without as many entries drawn at random (the
control), each on the validation task and the retention text (loss, KL(base || tuned)).

One process, the plain HF model (no ZeRO-3): the norms are one forward pass over the text. Appends one record
per adapter to bench/results/quality_channels.jsonl (per ablation to quality_ablation.jsonl), which
bench/quality/report.py tables.
"""

from __future__ import annotations

import argparse
import sys
from contextlib import contextmanager
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from bench.quality.plan import MICRO_BATCH, RETENTION, SEQ_LEN, SWEEP_TASK  # noqa: E402
from bench.quality.records import STEPS, WORK, append_record, read_records, read_results  # noqa: E402
from bench.quality.quality_tasks import write_task  # noqa: E402
from speft_ds.methods.speft.adapter_format import read_adapter  # noqa: E402
from speft_ds.methods.speft.delta_impls import add_delta_  # noqa: E402

CHANNELS = REPO / "bench" / "results" / "quality_channels.jsonl"
ABLATION = REPO / "bench" / "results" / "quality_ablation.jsonl"
TOPS = (0.01, 0.10)


@torch.no_grad()
def input_channel_norms(model, rows: list[dict], names: list[str]) -> dict[str, torch.Tensor]:
    """Per targeted linear, the L2 norm over every token of the text of each input channel."""
    sums = {name: None for name in names}

    def hook(name):
        def record(module, inputs):
            squares = inputs[0].detach().double().pow(2).reshape(-1, inputs[0].shape[-1]).sum(0)
            sums[name] = squares if sums[name] is None else sums[name] + squares
        return record

    handles = [model.get_submodule(name).register_forward_pre_hook(hook(name)) for name in names]
    for row in rows:
        model(input_ids=torch.tensor([row["input_ids"]]))
    for handle in handles:
        handle.remove()
    return {name: total.sqrt() for name, total in sums.items()}


def loud_channel_entries(indices: dict[str, torch.Tensor], shapes: dict, norms: dict, top: float) -> dict:
    """Per layer, which selected entries sit on its top `top` share of input channels by norm."""
    on_loud = {}
    for name, idx in indices.items():
        in_features = shapes[name][1]
        loud = torch.zeros(in_features, dtype=torch.bool)
        loud[norms[name].topk(max(1, round(top * in_features))).indices] = True
        on_loud[name] = loud[idx % in_features]
    return on_loud


def shares_on_loud_channels(indices: dict[str, torch.Tensor], shapes: dict, norms: dict) -> dict[str, float]:
    """The share of all selected entries whose input channel is in its layer's top fraction by norm."""
    k = sum(idx.numel() for idx in indices.values())
    on_loud = {top: loud_channel_entries(indices, shapes, norms, top) for top in TOPS}
    return {f"top_{top:.0%}": sum(int(on.sum()) for on in on_loud[top].values()) / k for top in TOPS}


@contextmanager
def weights_swapped(model, weights: dict[str, torch.Tensor]):
    """The model with these linears' weights in place of its own, restored afterwards."""
    saved = {name: model.get_submodule(name).weight.data for name in weights}
    for name, weight in weights.items():
        model.get_submodule(name).weight.data = weight
    try:
        yield
    finally:
        for name, weight in saved.items():
            model.get_submodule(name).weight.data = weight


def ablate(model, tokenizer, rows: list[dict], norms: dict, tag: str) -> None:
    """Score `tag`'s adapter whole, without its entries on the top 1% of channels, and without as many
    random entries; append one record per variant."""
    from speft_ds.data.batches import pad_token_id
    from speft_ds.data.retention import score_retention
    from speft_ds.data.task_eval import evaluate_task, load_task

    indices, values, adapter_config = read_adapter(WORK / tag / "adapter")
    on_loud = loud_channel_entries(indices, adapter_config["shapes"], norms, TOPS[0])
    dropped = sum(int(mask.sum()) for mask in on_loud.values())
    # the control drops as many entries drawn uniformly over all of k
    sizes = [idx.numel() for idx in indices.values()]
    drawn = torch.zeros(sum(sizes), dtype=torch.bool)
    drawn[torch.randperm(drawn.numel(), generator=torch.Generator().manual_seed(0))[:dropped]] = True
    at_random = dict(zip(indices, drawn.split(sizes)))
    base = {name: model.get_submodule(name).weight.data for name in indices}
    task = load_task(write_task(SWEEP_TASK, WORK / "ablation-tasks").validation)  # the cells read WORK/tasks
    for variant, drop in (("whole", None), ("without the top 1% channels' entries", on_loud),
                          ("without as many random entries", at_random)):
        tuned = {}
        for name, weight in base.items():
            keep = ~drop[name] if drop else torch.ones_like(indices[name], dtype=torch.bool)
            tuned[name] = add_delta_(weight.clone(), indices[name][keep], values[name][keep])
        with weights_swapped(model, tuned):
            accuracy = evaluate_task(model, tokenizer, task, show_progress=False)
            retention = score_retention(model, rows, MICRO_BATCH, pad_token_id(tokenizer), torch.device("cpu"),
                                        lambda: weights_swapped(model, base))
        record = {"tag": tag, "variant": variant, "k": sum(sizes),
                  "dropped": 0 if drop is None else dropped, "accuracy": accuracy.accuracy,
                  "stderr": accuracy.stderr, "retention_loss": retention["loss"], "kl": retention["kl"]}
        print(record, flush=True)
        append_record(record, ABLATION)


def main() -> int:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from speft_ds.config import DEFAULT_MODEL
    from speft_ds.data.retention import retention_rows
    from speft_ds.models.gguf import resolve_model

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ablate", metavar="TAG", help="A cell's tag: score its adapter without its loud-channel "
                                                        "entries, and without as many random ones.")
    args = parser.parse_args()
    cells = read_results()[0]
    done = {record["tag"] for record in read_records(CHANNELS)}
    # A long cell's mask is its short cell's (same seed, same calibration), so only the short cells are measured.
    todo = [cell for cell in cells if cell.method in ("speft", "channel", "cap", "random") and cell.tag not in done
            and cell.steps == STEPS and (WORK / cell.tag / "adapter").is_dir()]
    if not todo and not args.ablate:
        print("no SPEFT adapter here without its record")
        return 0
    model_dir = resolve_model(DEFAULT_MODEL)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rows = retention_rows(RETENTION, tokenizer, SEQ_LEN)
    linears = [name for name, module in model.named_modules()
               if isinstance(module, torch.nn.Linear) and ".layers." in name]  # SPEFT's default targets
    norms = input_channel_norms(model, rows, linears)
    for cell in todo:
        indices, _, adapter_config = read_adapter(WORK / cell.tag / "adapter")
        record = {"tag": cell.tag, "method": cell.method, "budget": cell.budget, "lr": cell.lr, "seed": cell.seed,
                  **shares_on_loud_channels(indices, adapter_config["shapes"], norms)}
        print(record, flush=True)
        append_record(record, CHANNELS)
    if args.ablate:
        ablate(model, tokenizer, rows, norms, args.ablate)
    return 0


if __name__ == "__main__":
    sys.exit(main())
