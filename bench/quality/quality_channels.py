"""Where a SPEFT mask sits against the input channels' activation norms: the share of k on each targeted
linear's top 1% and top 10% of input channels, ranked by the L2 norm of that channel's input over the
retention text (what an even spread gives: 1% and 10%). A gradient score |dY^T X| grows with the input's
magnitude, so a mask crowded onto loud channels changes what every token sees.

    python bench/quality/quality_channels.py          # every SPEFT cell of bench/quality/quality.py whose adapter is here

One process, the plain HF model (no ZeRO-3): the norms are one forward pass over the text. Appends one record
per adapter to bench/results/quality_channels.jsonl, which bench/quality/quality_report.py tables.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from bench.quality.quality import RETENTION, SEQ_LEN, WORK, read_results  # noqa: E402
from speft_ds.methods.speft.adapter_format import read_adapter  # noqa: E402

CHANNELS = REPO / "bench" / "results" / "quality_channels.jsonl"
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


def shares_on_loud_channels(indices: dict[str, torch.Tensor], shapes: dict, norms: dict) -> dict[str, float]:
    """The share of all selected entries whose input channel is in its layer's top fraction by norm."""
    k = sum(idx.numel() for idx in indices.values())
    shares = {}
    for top in TOPS:
        on_top = 0
        for name, idx in indices.items():
            in_features = shapes[name][1]
            loud = torch.zeros(in_features, dtype=torch.bool)
            loud[norms[name].topk(max(1, round(top * in_features))).indices] = True
            on_top += int(loud[idx % in_features].sum())
        shares[f"top_{top:.0%}"] = on_top / k
    return shares


def main() -> int:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from speft_ds.config import DEFAULT_MODEL
    from speft_ds.data.retention import retention_rows
    from speft_ds.models.gguf import resolve_model

    cells, _ = read_results()
    done = {json.loads(line)["tag"] for line in CHANNELS.read_text().splitlines()} if CHANNELS.is_file() else set()
    todo = [cell for cell in cells if cell.method in ("speft", "channel", "random") and cell.tag not in done
            and (WORK / cell.tag / "adapter").is_dir()]
    if not todo:
        print("no SPEFT adapter here without its record")
        return 0
    model_dir = resolve_model(DEFAULT_MODEL)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    rows = retention_rows(RETENTION, AutoTokenizer.from_pretrained(model_dir), SEQ_LEN)
    linears = [name for name, module in model.named_modules()
               if isinstance(module, torch.nn.Linear) and ".layers." in name]  # SPEFT's default targets
    norms = input_channel_norms(model, rows, linears)
    for cell in todo:
        indices, _, adapter_config = read_adapter(WORK / cell.tag / "adapter")
        record = {"tag": cell.tag, "method": cell.method, "budget": cell.budget, "lr": cell.lr, "seed": cell.seed,
                  **shares_on_loud_channels(indices, adapter_config["shapes"], norms)}
        print(record, flush=True)
        with CHANNELS.open("a") as fh:
            fh.write(json.dumps(record) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
