"""Train an adapter:

    deepspeed launch/train.py --ds_config ds_configs/z3.json [flags]
    deepspeed --module speft_ds.train [flags]      # the same, from an installed package

Every flag (and --config file) is checked before torch, DeepSpeed and transformers load, so bad input is
answered at once.
"""

import sys
from typing import Sequence

from speft_ds.cli import parse_config, run_main


def main(argv: Sequence[str]) -> int:
    config, explicit = parse_config(argv)
    from speft_ds.recipe import train

    return train(config, explicit)


if __name__ == "__main__":
    sys.exit(run_main(main))
