"""Look at an adapter's mask: a table and a PNG: `python launch/mask.py --help` (installed as `speft-mask`)."""

import sys

from speft_ds.commands import mask

if __name__ == "__main__":
    sys.exit(mask())
