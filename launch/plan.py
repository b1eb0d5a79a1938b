"""Per-rank memory of a job, before you launch it: `python launch/plan.py --help` (installed as `speft-plan`)."""

import sys

from speft_ds.commands import plan

if __name__ == "__main__":
    sys.exit(plan())
