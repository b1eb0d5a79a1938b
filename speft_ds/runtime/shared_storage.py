"""Checkpoints need --output_dir on storage every node sees: each rank writes its own file into one checkpoint
directory, and a resume reads every rank's. On node-local disks the first save (maybe hours in) would fail
late and confusingly, and a resume would fail on some nodes while the others wait; this check fails the job
within seconds instead, before the model loads."""

from __future__ import annotations

import os
import secrets
import socket
from pathlib import Path

import torch.distributed as dist

from ..config import ConfigError


def check_shared_output_dir(output_dir: str | Path) -> None:
    """Rank 0 writes a file with a fresh token into `output_dir`; every rank reads it back. A ConfigError on
    every rank (a collective) naming the ranks, and their hosts, that cannot see it."""
    out = Path(output_dir)
    written = [secrets.token_hex(16), None]  # rank 0's token, or why rank 0 could not write it
    if dist.get_rank() == 0:
        try:
            _write_durably(_probe(out, written[0]), written[0])
        except OSError as err:
            written = [None, f"{type(err).__name__}: {err}"]
    dist.broadcast_object_list(written, src=0)  # every rank stops together where rank 0 could not write
    token, failure = written
    if failure:
        raise ConfigError(f"--output_dir {out} cannot be written on rank 0 ({failure}): pass a directory the job "
                          "can write")
    probe = _probe(out, token)
    try:
        sees = probe.read_text() == token
    except OSError:
        sees = False
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, (sees, socket.gethostname()))
    if dist.get_rank() == 0:
        probe.unlink(missing_ok=True)
    blind = [(rank, host) for rank, (saw, host) in enumerate(every) if not saw]
    if blind:
        named = ", ".join(f"rank {rank} ({host})" for rank, host in blind)
        raise ConfigError(f"--output_dir {out} is not one directory for every node: {named} cannot see the file "
                          f"rank 0 ({every[0][1]}) wrote there. Checkpoints need --output_dir on storage every node "
                          "sees (NFS, Lustre, a shared volume)")


def _probe(out: Path, token: str) -> Path:
    return out / f".speft-shared-check-{token[:12]}"


def _write_durably(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
