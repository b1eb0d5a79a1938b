"""speft-train: the DeepSpeed launcher over speft_ds.train, with train.py's flags, checked before any rank starts:

    speft-train --num_gpus 8 --model /models/llama --dataset data.jsonl ...
    # is: deepspeed --num_gpus 8 --module speft_ds.train --model /models/llama --dataset data.jsonl ...

The launcher's own flags (below) go to deepspeed, every other flag to the training job.
"""

from __future__ import annotations

import os
import shutil

from ..cli import parse_config
from ..config import ConfigError

# DeepSpeed launcher flags -> whether each takes a value
LAUNCHER_FLAGS = {"--num_gpus": True, "--num_nodes": True, "--hostfile": True, "--master_addr": True,
                  "--master_port": True, "--include": True, "--exclude": True, "--no_ssh": False, "--node_rank": True,
                  "--launcher": True}


def split(argv: list[str]) -> tuple[list[str], list[str]]:
    """(the launcher's flags, the training job's)."""
    launcher, train, i = [], [], 0
    while i < len(argv):
        name = argv[i].split("=", 1)[0]
        if name in LAUNCHER_FLAGS:
            takes_value = LAUNCHER_FLAGS[name] and "=" not in argv[i]
            launcher += argv[i:i + 1 + takes_value]
            i += 1 + takes_value
        else:
            train.append(argv[i])
            i += 1
    return launcher, train


def main(argv) -> int:
    launcher, train = split(list(argv))
    parse_config(train)  # a bad flag is one line here, before any rank starts
    if shutil.which("deepspeed") is None:
        raise ConfigError("speft-train starts DeepSpeed's launcher, and `deepspeed` is not on PATH: install deepspeed")
    os.execvp("deepspeed", ["deepspeed", *launcher, "--module", "speft_ds.train", *train])
    return 0  # not reached: execvp replaces this process
