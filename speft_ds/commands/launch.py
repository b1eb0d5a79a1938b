"""speft-train: the DeepSpeed launcher over speft_ds.train, with train.py's flags, checked before any rank starts:

    speft-train --num_gpus 8 --model /models/llama --dataset data.jsonl ...
    # is: deepspeed --num_gpus 8 --module speft_ds.train --model /models/llama --dataset data.jsonl ...

The launcher's own flags (LAUNCHER_FLAGS: every flag of `deepspeed` but the three that pick the script) go to
deepspeed, every other flag to the training job; `speft-train --help` shows train.py's.
"""

from __future__ import annotations

import os
import shutil

from ..cli import parse_config
from ..config import ConfigError

# DeepSpeed's launcher flags (deepspeed.launcher.runner.parse_args) -> whether each takes a value; not
# --module, --no_python or --no_local_rank, which speft-train sets itself
_VALUED = ("-H", "--hostfile", "-i", "--include", "-e", "--exclude", "--num_nodes", "--num_gpus", "--num_accelerators",
           "--master_port", "--master_addr", "--node_rank", "--launcher", "--launcher_args", "--enable_each_rank_log",
           "--autotuning", "--bind_core_list", "--ssh_port", "--venv_script", "--log_level")
_BARE = ("--no_ssh", "--no_ssh_check", "--force_multi", "--save_pid", "--bind_cores_to_rank", "-q", "--quiet")
LAUNCHER_FLAGS = {**dict.fromkeys(_VALUED, True), **dict.fromkeys(_BARE, False)}


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
