"""Looking at a mask: a per-module table and a picture (density heat map + salience histogram)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

from ...config import ConfigError
from .. import adapter_type
from .adapter_format import read_adapter

_LAYER = re.compile(r"\.(\d+)\.")


@dataclass
class ModuleRow:
    name: str
    shape: tuple[int, int]
    k: int

    @property
    def density(self) -> float:
        return self.k / (self.shape[0] * self.shape[1])


def mask_rows(adapter_dir: str | Path) -> tuple[list[ModuleRow], dict]:
    if adapter_type(adapter_dir) != "SPEFT":
        raise ConfigError(f"{adapter_dir} holds a LoRA adapter (HF PEFT's format, from --peft lora or roselora): "
                          "the mask tool draws SPEFT masks; load LoRA files with peft")
    indices, _, adapter_config = read_adapter(adapter_dir)
    rows = [ModuleRow(name, tuple(adapter_config["shapes"][name]), int(idx.numel())) for name, idx in indices.items()]
    return rows, adapter_config


def format_table(rows: list[ModuleRow], adapter_config: dict) -> str:
    width = max(len("module"), *(len(r.name) for r in rows))
    lines = [f"{'module':<{width}}  {'shape':>13}  {'k':>10}  {'density':>8}"]
    lines += [f"{r.name:<{width}}  {'x'.join(map(str, r.shape)):>13}  {r.k:>10}  {r.density:>8.4%}" for r in rows]
    # Weights without a selected entry are not in the adapter; the overall density counts them.
    lines.append(f"{'total (all targeted weights)':<{width}}  {'':>13}  {adapter_config['k']:>10}  "
                 f"{adapter_config['density']:>8.4%}")
    return "\n".join(lines)


def density_grid(rows: list[ModuleRow]) -> tuple[list[int], list[str], list[list[float]]]:
    """Densities by (layer index, module type); modules outside numbered blocks are left out."""
    cells = {}
    for r in rows:
        match = _LAYER.search(r.name)
        if match:
            cells[(int(match.group(1)), r.name.rsplit(".", 1)[-1])] = r.density
    layers = sorted({layer for layer, _ in cells})
    kinds = list(dict.fromkeys(kind for _, kind in cells))
    return layers, kinds, [[cells.get((layer, kind), 0.0) for kind in kinds] for layer in layers]


def plot_mask(rows: list[ModuleRow], adapter_config: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers, kinds, grid = density_grid(rows)
    fig, (heat, hist) = plt.subplots(1, 2, figsize=(12, max(3.0, 0.35 * len(layers) + 1.5)))
    heat.set_title(f"density per layer x module (k = {adapter_config['k']:,})")
    if layers:
        image = heat.imshow(grid, aspect="auto", cmap="viridis")
        heat.set_xticks(range(len(kinds)), kinds, rotation=45, ha="right")
        heat.set_yticks(range(len(layers)), [str(layer) for layer in layers])
        heat.set_xlabel("module")
        heat.set_ylabel("layer")
        fig.colorbar(image, ax=heat)
    else:
        heat.text(0.5, 0.5, "no selected entry inside the decoder blocks", ha="center", va="center")
        heat.set_axis_off()

    summary = adapter_config.get("salience_summary")
    if summary:
        edges = summary["log10_edges"]
        centers = [(a + b) / 2 for a, b in zip(edges, edges[1:])]
        width = edges[1] - edges[0]
        hist.bar(centers, summary["positive"], width=width, label="score > 0")
        if any(summary["negative"]):
            hist.bar(centers, summary["negative"], width=width, alpha=0.6, label="score < 0")
        lowest = summary["lowest_selected"]
        if lowest > 0:
            hist.axvline(math.log10(lowest), color="red", label="lowest selected")
        hist.set_yscale("log")
        hist.set_xlabel("log10 |score|")
        hist.set_ylabel("elements")
        hist.set_title(f"salience ({adapter_config.get('metric', '?')}); {summary['zero']:,} zero scores")
        hist.legend()
    else:
        hist.set_axis_off()
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
