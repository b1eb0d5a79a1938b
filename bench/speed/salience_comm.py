"""What overlapping the salience pass's reduce-scatters with the backward can save at most: the time one
calibration micro-batch's dW reduce-scatters take when run back to back, for the 124M LLaMA's targeted
weights (7 per layer, 12 layers) on 2 gloo ranks, one thread each.

    python bench/speed/salience_comm.py
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.common.random_llama import LLAMA_124M  # noqa: E402
from speft_ds.runtime.distributed import free_port  # noqa: E402
from speft_ds.runtime.memory_plan import ModelShape  # noqa: E402

REPEATS = 5


def _rank(rank: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    shape = ModelShape.from_config(LLAMA_124M)
    grads = [torch.randn(n) for n in shape.layer_linears().values()] * shape.layers
    seconds = []
    for _ in range(REPEATS):
        dist.barrier()
        start = time.perf_counter()
        for grad in grads:
            dist.reduce_scatter_tensor(torch.empty(grad.numel() // 2), grad)
        seconds.append(time.perf_counter() - start)
    if rank == 0:
        megabytes = sum(g.numel() for g in grads) * 4 / 1e6
        print(f"one micro-batch's dW reduce-scatters ({megabytes:.0f} MB per rank): median "
              f"{statistics.median(seconds):.3f} s of {REPEATS}")
    dist.destroy_process_group()


if __name__ == "__main__":
    mp.spawn(_rank, args=(free_port(),), nprocs=2)
