"""The single-process tools, each a module with `main(argv) -> int` (merge.py, generate.py, plan.py, mask.py,
evaluate.py; launch.py, speft-train, which starts DeepSpeed's launcher over the training job), the logic only a tool uses beside it (merging.py: the streaming merge into a sharded
checkpoint), and their console scripts (pyproject's [project.scripts]; launch/*.py run the same). A tool's
module is imported only when it runs, so a bad flag is answered before torch, DeepSpeed or transformers load.
On the top floor with recipe.py, cli.py and train.py, the tools may import anything in the package."""

from __future__ import annotations

import importlib
from typing import Callable

from ..cli import run_main

MODULES = {"merge": "speft_ds.commands.merge", "generate": "speft_ds.commands.generate",
           "plan": "speft_ds.commands.plan", "mask": "speft_ds.commands.mask", "evaluate": "speft_ds.commands.evaluate",
           "train": "speft_ds.commands.launch"}


def _entry_point(name: str) -> Callable[[], int]:
    def run() -> int:
        return run_main(importlib.import_module(MODULES[name]).main)

    run.__name__ = name
    return run


merge, generate, plan, mask, evaluate, train = (_entry_point(name) for name in MODULES)
