"""What the launcher told this process, read from its environment before the process group exists.

The DeepSpeed launcher and torchrun set RANK, WORLD_SIZE, LOCAL_RANK; mpiexec/mpirun set their own:
MPICH and Intel MPI (PMI_*, MPI_LOCAL*), Open MPI (OMPI_COMM_WORLD_*), MVAPICH (MV2_COMM_WORLD_*).
"""

from __future__ import annotations

import os

_WORLD_SIZE = ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE")
_LOCAL_RANK = ("LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "MV2_COMM_WORLD_LOCAL_RANK")
_LOCAL_SIZE = ("LOCAL_SIZE", "LOCAL_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS",
               "MV2_COMM_WORLD_LOCAL_SIZE")


def _first(names: tuple[str, ...], default: int) -> int:
    return next((int(os.environ[name]) for name in names if name in os.environ), default)


def world_size_from_env() -> int:
    return _first(_WORLD_SIZE, 1)


def local_rank_from_env() -> int:
    return _first(_LOCAL_RANK, 0)


def local_size_from_env() -> int:
    """Ranks on this machine (they share its cores)."""
    return _first(_LOCAL_SIZE, 1)


def launched_by_mpi() -> bool:
    """Started by mpiexec/mpirun rather than by a launcher that sets torch's variables."""
    return "RANK" not in os.environ and world_size_from_env() > 1
