"""Fold an adapter into its base model: `python launch/merge.py --help` (installed as `speft-merge`)."""

import sys

from speft_ds.commands import merge

if __name__ == "__main__":
    sys.exit(merge())
