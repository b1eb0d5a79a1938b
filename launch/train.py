"""Train an adapter: `deepspeed launch/train.py --ds_config ds_configs/z3.json [flags]` (see --help)."""

import sys

from speft_ds.cli import run_main
from speft_ds.train import main

if __name__ == "__main__":
    sys.exit(run_main(main))
