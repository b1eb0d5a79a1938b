"""A rank that dies or hangs mid-training stops the whole job within 2 minutes, with a message naming it.

Each rank runs under its own `deepspeed --no_ssh --node_rank N` launcher (two "nodes" on loopback), as on
a cluster: no launcher sees both ranks, so none can rescue the job by killing the survivor."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from speft_ds.config import TrainingError
from speft_ds.runtime.distributed import CHECK_IN_S, free_port, init_distributed, naming_lost_ranks
from tests.models import write_dataset, write_tiny_llama

REPO = Path(__file__).resolve().parents[1]
STOP_WITHIN_S = 120


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("rank-failure")
    dataset = root / "data.jsonl"
    write_dataset(dataset, 64)
    hostfile = root / "hostfile"
    hostfile.write_text("localhost slots=1\n127.0.0.1 slots=1\n")  # two names for this machine: two nodes
    return write_tiny_llama(root / "llama"), dataset, hostfile


def _start_nodes(inputs, out: Path, port: int, *extra: str) -> list[tuple[subprocess.Popen, Path]]:
    model_dir, dataset, hostfile = inputs
    nodes = []
    for node in (0, 1):
        log = out.parent / f"{out.name}-node{node}.log"
        command = ["deepspeed", "--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(node),
                   "--master_addr", "127.0.0.1", "--master_port", str(port), "launch/train.py",
                   "--model", str(model_dir), "--dataset", str(dataset), "--output_dir", str(out),
                   "--max_steps", "100000", "--micro_batch_size", "2", "--seq_len", "48", "--logging_steps", "1",
                   "--calibration_examples", "8", "--val_size", "0.1", *extra]
        with log.open("w") as sink:
            nodes.append((subprocess.Popen(command, cwd=REPO, stdout=sink, stderr=subprocess.STDOUT,
                                           env={**os.environ, "DS_ACCELERATOR": "cpu"}, start_new_session=True),
                          log))
    return nodes


def _rank_pid(port: int, rank: int) -> int:
    """The training process of `rank` in the job that rendezvouses on `port`."""
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes()
            environ = (proc / "environ").read_bytes().split(b"\0")
        except (OSError, ValueError):
            continue
        if b"launch/train.py" in cmdline and f"MASTER_PORT={port}".encode() in environ \
                and f"RANK={rank}".encode() in environ:
            return int(proc.name)
    raise AssertionError(f"no process for rank {rank}")


def _wait_for_training(out: Path, nodes) -> None:
    deadline = time.monotonic() + 300
    metrics = out / "metrics.jsonl"
    while not (metrics.exists() and metrics.read_text().count('"step"') >= 3):
        assert all(job.poll() is None for job, _ in nodes), [log.read_text()[-2000:] for _, log in nodes]
        assert time.monotonic() < deadline, "training did not start"
        time.sleep(0.2)


@pytest.mark.parametrize("victim, how, expected", [
    (1, signal.SIGKILL, "error: rank 1 stopped responding"),
    (0, signal.SIGKILL, "error: rank 0 (which hosts the rendezvous store"),
    (1, signal.SIGSTOP, "error: rank 1 stopped responding"),  # a hang: only the collective timeout ends it
])
def test_a_dead_or_hung_rank_stops_every_other_rank_with_its_name(inputs, tmp_path, victim, how, expected):
    port = free_port()
    out = tmp_path / "out"
    # The tool sets the collective timeout (the backend's default is 30 minutes); 20 s keeps the hang case short.
    nodes = _start_nodes(inputs, out, port, "--ddp_timeout", "20")
    try:
        _wait_for_training(out, nodes)
        victim_pid = _rank_pid(port, victim)
        os.kill(victim_pid, how)
        killed_at = time.monotonic()
        survivor, survivor_log = nodes[1 - victim]
        survivor.wait(timeout=STOP_WITHIN_S)
        assert time.monotonic() - killed_at < STOP_WITHIN_S
        assert survivor.returncode != 0
        errors = [line for line in survivor_log.read_text().splitlines() if line.startswith("error: ")]
        assert len(errors) == 1 and errors[0].startswith(expected), survivor_log.read_text()[-3000:]
        if how == signal.SIGSTOP:
            os.kill(victim_pid, signal.SIGKILL)  # a stopped process outlives any timeout: the test ends it
        victim_launcher, _ = nodes[victim]
        victim_launcher.wait(timeout=STOP_WITHIN_S)
        assert victim_launcher.returncode != 0
        assert not (out / "adapter").exists()
    finally:
        for job, _ in nodes:
            if job.poll() is None:
                os.killpg(job.pid, signal.SIGKILL)
                job.wait()


COLLECTIVE_TIMEOUT_S = 2


def _wait_on_the_last_of_several_collectives(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    init_distributed(timeout_s=COLLECTIVE_TIMEOUT_S)
    if rank == 1:  # hangs: joins no collective, and outlives rank 0's timeout and check-in
        time.sleep(COLLECTIVE_TIMEOUT_S + CHECK_IN_S + 5)
        os._exit(0)
    # Several collectives in flight, as ZeRO-3's prefetch leaves them: the first to time out closes every
    # connection, and the others then fail with a text that names no gloo source file.
    works = [dist.all_reduce(torch.ones(4), async_op=True) for _ in range(3)]
    try:
        with naming_lost_ranks():
            works[-1].wait()
    except TrainingError as err:
        Path(out_dir, "error").write_text(str(err))


def test_a_collective_failed_by_another_ones_timeout_names_the_hung_rank(tmp_path):
    ctx = mp.get_context("spawn")
    port = free_port()
    ranks = [ctx.Process(target=_wait_on_the_last_of_several_collectives, args=(r, port, str(tmp_path)))
             for r in (0, 1)]
    for proc in ranks:
        proc.start()
    for proc in ranks:
        proc.join(STOP_WITHIN_S)
        if proc.is_alive():
            proc.kill()
    error = (tmp_path / "error").read_text()
    assert error.startswith("rank 1 stopped responding"), error
    assert "Application timeout caused pair closure" in error  # the case this covers, not a plain timeout
