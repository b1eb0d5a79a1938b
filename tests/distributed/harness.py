"""Run a function on N real ranks (separate processes, gloo, explicit free port) and collect results."""

from __future__ import annotations

import faulthandler
import os
import sys
import traceback
import warnings
from pathlib import Path

import torch
import torch.multiprocessing as mp

from speft_ds.runtime.distributed import free_port


def _worker(rank: int, world_size: int, port: int, fn, args: tuple, out_dir: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                      OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    faulthandler.enable()  # a rank killed by a signal prints every thread's Python stack to the captured stderr
    warnings.filterwarnings("error", module="speft_ds")  # as pyproject's filterwarnings does in-process
    try:
        from speft_ds.runtime.distributed import init_distributed, leave_process_group

        init_distributed()
        result = fn(rank, world_size, *args)
        torch.save(result, Path(out_dir, f"rank{rank}.pt"))
        # As a finished run ends: every rank done, then the backend closed here, not by interpreter exit.
        leave_process_group()
    except BaseException:
        Path(out_dir, f"rank{rank}.err").write_text(traceback.format_exc())
        raise SystemExit(1)
    # The rank's work is done, saved and its group closed. Skip interpreter finalization: now and then
    # (about one run in a few hundred, in CI once) a C++ destructor run there aborts a finished rank
    # ("terminate called without an active exception", rc -6), which says nothing about what fn computed.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_ranks(fn, world_size: int, *args, out_dir: Path, timeout: float = 900) -> list:
    """fn(rank, world_size, *args) on each rank; returns the per-rank results (tensors, dicts, lists)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, fn, args, str(out_dir))) for r in range(world_size)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout)
    for p in procs:
        if p.is_alive():
            p.kill()
    errors = [Path(out_dir, f"rank{r}.err").read_text() for r in range(world_size) if Path(out_dir, f"rank{r}.err").exists()]
    if errors or any(p.exitcode != 0 for p in procs):
        raise AssertionError(f"ranks failed (exit codes {[p.exitcode for p in procs]}):\n" + "\n".join(errors))
    return [torch.load(Path(out_dir, f"rank{r}.pt"), weights_only=True) for r in range(world_size)]
