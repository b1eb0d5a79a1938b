"""Task accuracy of a model, with or without an adapter: `python launch/evaluate.py --help` (`speft-evaluate`)."""

import sys

from speft_ds.commands import evaluate

if __name__ == "__main__":
    sys.exit(evaluate())
