"""Process-group setup: the DeepSpeed launcher, torchrun, or a plain `python` run as one rank."""

from __future__ import annotations

import ctypes
import importlib.util
import os
import socket
import time
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator

from ..config import ConfigError, TrainingError
from .launch_env import launched_by_mpi, local_rank_from_env, local_size_from_env

DEFAULT_MASTER_PORT = 29500  # torch's and DeepSpeed's

# How long a rank that saw a collective fail waits for the other survivors to report in.
CHECK_IN_S = 10.0


def _glibc():
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:  # not glibc (macOS, musl)
        return None


_LIBC = _glibc()


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
    by_mpi = launched_by_mpi()
    if by_mpi and importlib.util.find_spec("mpi4py") is None:
        raise ConfigError("this job was started by mpiexec/mpirun, which needs mpi4py: pip install 'speft-ds[mpi]' "
                          "(or mpi4py built against your MPI)")
    if not by_mpi and "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    if "OMP_NUM_THREADS" not in os.environ:
        # Ranks on one machine share its cores; oversubscribing them slows every rank down.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_size_from_env()))
    accelerator = get_accelerator()
    backend = "gloo" if accelerator.device_name() == "cpu" else accelerator.communication_backend_name()
    # Under MPI, DeepSpeed's discovery (mpi4py) sets RANK, WORLD_SIZE, LOCAL_RANK and MASTER_ADDR (rank 0's
    # first address); the port is ours to choose.
    deepspeed.init_distributed(dist_backend=backend, timeout=timedelta(seconds=timeout_s), auto_mpi_discovery=by_mpi,
                               distributed_port=int(os.environ.get("MASTER_PORT", DEFAULT_MASTER_PORT)),
                               verbose=not by_mpi)
    # Each rank's own device before any collective: torch's object collectives (a checkpoint's checks, the
    # shared-storage check) place their tensors on the current device, which is otherwise cuda:0 for all.
    accelerator.set_device(local_rank_from_env())
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


def leave_process_group() -> None:
    """End a finished run cleanly: every rank done (the barrier), then the backend's threads and
    connections closed here rather than torn down by interpreter exit. DeepSpeed's own call also drops the
    groups it caches (its world group), which would otherwise keep their threads alive."""
    dist.barrier()
    deepspeed.comm.destroy_process_group()


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(key))


def memory_mib_per_rank() -> dict[str, list[float]]:
    """Each rank's resident memory now and its peak since the last reset_peak_memory (Linux's VmRSS and
    VmHWM, the process's own; getrusage's peak also counts what the launcher held before exec), and on an
    accelerator its peak allocated memory, in MiB, on every rank (a collective). Zeros where /proc is
    missing."""
    try:
        mine = [_status_kib("VmRSS:") / 1024.0, max(_rss_peak_mib(), _phase_peak_mib[0])]
    except (OSError, StopIteration):
        mine = [0.0, 0.0]
    accelerator = get_accelerator()
    on_accelerator = accelerator.device_name() != "cpu"
    if on_accelerator:
        mine.append(accelerator.max_memory_allocated() / 2**20)
    every = per_rank(mine)
    record = {"rss_mib_per_rank": [round(r[0], 1) for r in every],
              "peak_rss_mib_per_rank": [round(r[1], 1) for r in every]}
    if on_accelerator:
        record["device_peak_mib_per_rank"] = [round(r[2], 1) for r in every]
    return record


def sum_over_ranks(value: float) -> float:
    """A float summed over every rank (float64, a collective)."""
    tensor = torch.tensor(value, dtype=torch.float64, device=device())
    dist.all_reduce(tensor)
    return tensor.item()


def per_rank(values: list[float]) -> list[list[float]]:
    """Every rank's `values` (the same length on each), in rank order, on every rank. A collective."""
    every = [torch.zeros(len(values), dtype=torch.float64, device=device()) for _ in range(dist.get_world_size())]
    dist.all_gather(every, torch.tensor(values, dtype=torch.float64, device=device()))
    return [t.tolist() for t in every]


def from_rank_0(read):
    """`read()` on rank 0 and its value on every rank (one broadcast); without a process group, this
    process's own."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return read()
    value = [read() if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(value, src=0)
    return value[0]


def on_every_rank(value) -> list:
    """Every rank's `value` (small, picklable), in rank order (one collective where a group exists)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [value]
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, value)
    return every


def gather_ragged(mine: torch.Tensor) -> torch.Tensor:
    """Every rank's 1-D tensor (their lengths may differ), joined in rank order, on every rank: two
    all-gathers, through the communication device."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return mine
    world, local = dist.get_world_size(), mine.to(device())
    counts = [torch.empty(1, dtype=torch.int64, device=local.device) for _ in range(world)]
    dist.all_gather(counts, torch.tensor([local.numel()], dtype=torch.int64, device=local.device))
    longest = max(int(c) for c in counts)
    padded = [torch.empty(longest, dtype=local.dtype, device=local.device) for _ in range(world)]
    dist.all_gather(padded, torch.nn.functional.pad(local, (0, longest - local.numel())))
    return torch.cat([part[:int(c)] for part, c in zip(padded, counts)]).to(mine.device)


def release_freed_memory() -> None:
    """Hand freed heap memory back to the OS (glibc's malloc_trim). glibc keeps what large transient
    tensors (activations, logits, per-layer dW) leave behind: 1.9 GB of RSS after a 124M model's
    salience pass was such memory, held per rank and growing with each calibration batch."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


# A phase's peak RSS (MiB) from before a block measured inside it (block_memory) restarted VmHWM.
_phase_peak_mib = [0.0]


@contextmanager
def block_memory():
    """Measure a block's own host memory inside a phase without losing the phase's peak: yields a dict that,
    after the block, holds every rank's RSS before it and peak RSS during it (MiB; collectives)."""
    before = memory_mib_per_rank()
    _phase_peak_mib[0] = before["peak_rss_mib_per_rank"][dist.get_rank()]
    _reset_rss_peak()
    measured: dict = {}
    yield measured
    measured.update(rss_before_mib_per_rank=before["rss_mib_per_rank"],
                    peak_rss_mib_per_rank=[round(r[0], 1) for r in per_rank([_rss_peak_mib()])])


def _rss_peak_mib() -> float:
    """VmHWM: the peak RSS since the last reset (0 where /proc is missing)."""
    try:
        return _status_kib("VmHWM:") / 1024.0
    except (OSError, StopIteration):
        return 0.0


def _reset_rss_peak() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
    except OSError:
        pass


def reset_peak_memory() -> None:
    """Start new peaks (VmHWM from the current RSS, and the accelerator's), so each phase's own can be read."""
    _phase_peak_mib[0] = 0.0
    _reset_rss_peak()
    if get_accelerator().device_name() != "cpu":
        get_accelerator().reset_peak_memory_stats()


def device() -> torch.device:
    """Where this rank computes, and where tensors given to collectives live (NCCL needs the GPU)."""
    return torch.device(get_accelerator().current_device_name())


# NCCL and store failures are typed; gloo raises plain RuntimeErrors whose text names its source file,
# except when one timed-out operation closes every pair: the other operations in flight then fail with
# this bare text (a hung peer during ZeRO-3's prefetch surfaces that way).
_GLOO_FAILURE_TEXTS = ("gloo/", "Application timeout caused pair closure")


def is_communication_failure(err: BaseException) -> bool:
    return isinstance(err, dist.DistError) or (
        isinstance(err, RuntimeError) and any(text in str(err) for text in _GLOO_FAILURE_TEXTS))


def _ranks_not_checking_in(rank: int, world_size: int) -> list[int] | None:
    """Each survivor of a failed collective checks in with the rendezvous store (hosted by rank 0); the
    ranks missing after CHECK_IN_S died or hang. None when the store itself is gone (rank 0 died)."""
    address = (os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]))
    try:
        # A plain connect first: it is refused at once where rank 0 is gone, where a TCPStore client would
        # retry until its timeout and log C++ stack traces meanwhile.
        socket.create_connection(address, timeout=CHECK_IN_S).close()
        store = dist.TCPStore(*address, is_master=False, timeout=timedelta(seconds=CHECK_IN_S))
        store.set(f"speft/alive/{rank}", "1")
        deadline = time.monotonic() + CHECK_IN_S
        while True:
            missing = [r for r in range(world_size) if not store.check([f"speft/alive/{r}"])]
            if not missing or time.monotonic() > deadline:
                return missing
            time.sleep(0.2)
    except (OSError, RuntimeError):
        return None


@contextmanager
def naming_lost_ranks():
    """Turn a failed collective (a rank died, hangs past the timeout, or its node vanished) into a
    TrainingError that names the ranks which stopped responding, so no rank waits on a dead peer."""
    try:
        yield
    except Exception as err:
        if not (dist.is_initialized() and dist.get_world_size() > 1 and is_communication_failure(err)):
            raise
        rank, world_size = dist.get_rank(), dist.get_world_size()
        cause = str(err).strip().splitlines()[0][:300]
        try:  # close this rank's connections, so peers blocked on it fail now rather than at their timeout
            deepspeed.comm.destroy_process_group()
        except Exception:
            pass
        missing = _ranks_not_checking_in(rank, world_size)
        if missing is None:
            lost = f"rank 0 (which hosts the rendezvous store at {os.environ.get('MASTER_ADDR')}:" \
                   f"{os.environ.get('MASTER_PORT')}) is unreachable"
        elif missing:
            lost = (f"rank{'s' if len(missing) > 1 else ''} {', '.join(map(str, missing))} stopped responding "
                    "(died, was killed or hangs)")
        else:
            lost = "a connection between ranks failed although every rank is still running"
        raise TrainingError(f"{lost}; rank {rank} is stopping too. Its collective failed with: {cause}. "
                            "See the other ranks' output; with --save_steps, --resume continues from the last "
                            "checkpoint") from err
