"""Answer a prompt with a base model and an adapter: `python launch/generate.py --help` (installed as `speft-generate`)."""

import sys

from speft_ds.commands import generate

if __name__ == "__main__":
    sys.exit(generate())
