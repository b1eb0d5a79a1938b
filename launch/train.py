"""Train a sparse-delta adapter: `deepspeed launch/train.py --ds_config ds_configs/z3.json [flags]`."""

import os
import sys

# launch/inspect.py shares its name with the standard library's `inspect` (which torch imports): keep this
# folder off the import path.
sys.path = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

from speft_ds.cli import run_main
from speft_ds.recipe import main

if __name__ == "__main__":
    sys.exit(run_main(main))
