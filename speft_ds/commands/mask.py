"""Look at an adapter's mask: a per-module table, and a PNG (density per layer x module, salience histogram).

    speft-mask OUTPUT_DIR/adapter [--out mask.png]
"""

import importlib.util
from pathlib import Path

from speft_ds.cli import Parser
from speft_ds.config import ConfigError


def main(argv) -> int:
    parser = Parser(description=__doc__.splitlines()[0])
    parser.add_argument("adapter", help="Adapter directory (adapter_model.safetensors + adapter_config.json).")
    parser.add_argument("--out", help="PNG to write (default: mask.png beside the adapter directory).")
    args = parser.parse_args(argv)
    adapter = Path(args.adapter)
    out = Path(args.out) if args.out else adapter.parent / "mask.png"
    if importlib.util.find_spec("matplotlib") is None:
        raise ConfigError("plotting needs matplotlib: pip install 'speft-ds[plot]'")

    from speft_ds.methods.speft.report import format_table, mask_rows, plot_mask

    rows, adapter_config = mask_rows(adapter)
    print(format_table(rows, adapter_config))
    plot_mask(rows, adapter_config, out)
    print(f"picture written to {out}")
    return 0
