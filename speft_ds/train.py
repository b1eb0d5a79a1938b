"""Train an adapter:

    deepspeed launch/train.py --ds_config ds_configs/z3.json [flags]
    deepspeed --module speft_ds.train [flags]      # the same, from an installed package

Every flag (and --config file) is checked before torch, DeepSpeed and transformers load, so bad input is
answered at once.
"""

import sys
from typing import Sequence

from speft_ds.cli import default_lines, is_reporting_rank, parse_config, run_main


def main(argv: Sequence[str]) -> int:
    config, explicit = parse_config(argv)
    if is_reporting_rank():  # one line per default the job falls back to, as the user may not know it has one
        for line in default_lines(explicit):
            print(line, flush=True)
    if config.dry_run:
        from speft_ds.commands.plan import dry_run

        return dry_run(config, explicit)
    from speft_ds.models.hub import fetch_hub_names

    fetch_hub_names(config)  # before torch loads: a hub without network is one line within seconds
    from speft_ds.recipe import train

    return train(config, explicit)


if __name__ == "__main__":
    sys.exit(run_main(main))
