"""Process-group setup: the DeepSpeed launcher, torchrun, or a plain `python` run as one rank."""

from __future__ import annotations

import os
import socket
from datetime import timedelta
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def free_port() -> int:
    """A TCP port free on this machine now (for a master port; the default 29500 may be taken)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_distributed(timeout_s: int = 600) -> None:
    """Join (or, for a plain `python` run, form) the process group; CPU uses gloo. Collectives fail after
    `timeout_s` instead of the backend's default of 30 minutes."""
    if dist.is_initialized():
        return
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    if "OMP_NUM_THREADS" not in os.environ:
        # Ranks on one machine share its cores; oversubscribing them slows every rank down.
        local_ranks = int(os.environ.get("LOCAL_SIZE", os.environ.get("LOCAL_WORLD_SIZE", "1")))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_ranks))
    accelerator = get_accelerator()
    backend = "gloo" if accelerator.device_name() == "cpu" else accelerator.communication_backend_name()
    deepspeed.init_distributed(dist_backend=backend, timeout=timedelta(seconds=timeout_s))
    _unlink_shm_buffers()


def _unlink_shm_buffers() -> None:
    """DeepSpeed's CPU shared-memory all-reduce maps a 66 MB /dev/shm buffer per rank and never removes
    its name, so every run would leave RAM-backed files behind. Once every rank has mapped them (the
    barrier), removing the names frees the memory when the processes end; nothing here opens them later."""
    shm = Path("/dev/shm")
    if not shm.is_dir():
        return
    dist.barrier()
    address, port, rank = os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"], dist.get_rank()
    for buffer in shm.glob(f"deepspeed_allreduce_buffer_*_{address}_{port}_{rank}"):
        buffer.unlink(missing_ok=True)


def device() -> torch.device:
    """Where this rank computes, and where tensors given to collectives live (NCCL needs the GPU)."""
    return torch.device(get_accelerator().current_device_name())
