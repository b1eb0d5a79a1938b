"""Look at an adapter's mask: a per-module table, and a PNG (density per layer x module, salience histogram).

    python launch/inspect.py OUTPUT_DIR/adapter [--out mask.png]
"""

import os
import sys

# launch/inspect.py shares its name with the standard library's `inspect` (which torch imports): keep this
# folder off the import path.
sys.path = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

from pathlib import Path  # noqa: E402

from speft_ds.cli import Parser, run_main  # noqa: E402
from speft_ds.config import ConfigError  # noqa: E402


def main(argv) -> int:
    parser = Parser(description=__doc__.splitlines()[0])
    parser.add_argument("adapter", help="Adapter directory (adapter_model.safetensors + adapter_config.json).")
    parser.add_argument("--out", help="PNG to write (default: mask.png beside the adapter directory).")
    args = parser.parse_args(argv)
    adapter = Path(args.adapter)
    out = Path(args.out) if args.out else adapter.parent / "mask.png"
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ConfigError("plotting needs matplotlib: pip install 'speft-ds[plot]'") from None

    from speft_ds.report import format_table, mask_rows, plot_mask

    rows, adapter_config = mask_rows(adapter)
    print(format_table(rows, adapter_config))
    plot_mask(rows, adapter_config, out)
    print(f"picture written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
