"""A real two-host job on one machine: two network namespaces joined by a veth pair, one rank per "host", gloo
bound to the veth, each host started the way clusters without ssh start them (one launcher per node with the
same hostfile: `deepspeed --hostfile H --no_ssh --node_rank N`, and `torchrun --nnodes 2`).

- A shared output directory: the job trains and saves, and its adapter is bitwise the 2-rank single-host run's.
- Node-local output directories (host b sees its own, private directory at the same path, by a mount
  namespace): refused in one line within seconds, naming the rank and host that cannot see rank 0's file.
- One host's rank killed mid-run: the other exits within --ddp_timeout with a line naming the lost rank, and a
  resume on both hosts reaches the uninterrupted run's adapter.

Needs root (network and mount namespaces); CI runs as root and sets CI, where these tests never skip.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from speft_ds.runtime.distributed import free_port
from tests.models import tiny_job

REPO = Path(__file__).resolve().parents[1]
STEPS, SAVE_EVERY, TIMEOUT_S = 8, 2, 20


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


@contextmanager
def two_hosts():
    """Two network namespaces joined by a veth pair; yields [(namespace, address, interface)] for hosts a
    and b, and removes both namespaces (and with them the veth pair) even when the test fails."""
    tag = secrets.token_hex(3)
    hosts = [(f"spn{side}{tag}", f"10.{200 + int(tag[:2], 16) % 50}.{int(tag[2:4], 16)}.{n}", f"spv{side}{tag}")
             for n, side in ((1, "a"), (2, "b"))]
    try:
        for namespace, _, _ in hosts:
            _ip("netns", "add", namespace)
        _ip("link", "add", hosts[0][2], "type", "veth", "peer", "name", hosts[1][2])
        for namespace, address, interface in hosts:
            _ip("link", "set", interface, "netns", namespace)
            _ip("-n", namespace, "addr", "add", f"{address}/24", "dev", interface)
            _ip("-n", namespace, "link", "set", interface, "up")
            _ip("-n", namespace, "link", "set", "lo", "up")
    except (subprocess.CalledProcessError, FileNotFoundError) as err:
        for namespace, _, _ in hosts:
            subprocess.run(["ip", "netns", "del", namespace], capture_output=True)
        if os.environ.get("CI"):
            raise
        pytest.skip(f"network namespaces are refused here ({getattr(err, 'stderr', err)!s:.200}); CI runs them as root")
    try:
        yield hosts
    finally:
        for namespace, _, _ in hosts:
            subprocess.run(["ip", "netns", "del", namespace], capture_output=True)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return tiny_job(tmp_path_factory.mktemp("two-hosts"), 48)


@pytest.fixture(scope="module")
def hosts():
    with two_hosts() as pair:
        yield pair


def _train_args(inputs, out: Path, *extra: str) -> list[str]:
    _, model_dir, dataset = inputs
    return ["launch/train.py", "--model", str(model_dir), "--dataset", str(dataset), "--output_dir", str(out),
            "--max_steps", str(STEPS), "--save_steps", str(SAVE_EVERY), "--micro_batch_size", "2", "--seq_len", "48",
            "--calibration_examples", "16", "--density", "0.05", "--learning_rate", "1e-2", "--val_size", "0.1",
            "--logging_steps", "1", "--eval_task", "none", *extra]


def _env(interface: str | None = None) -> dict[str, str]:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    return {**env, "GLOO_SOCKET_IFNAME": interface} if interface else env


def _on_host(host, name: str, command: list[str], private_dir: Path | None = None) -> list[str]:
    """`command` inside the host's network namespace, with its own host name (a UTS namespace) and, given
    `private_dir`, a private empty directory mounted there (a mount namespace)."""
    namespace = host[0]
    mount = f'mount -t tmpfs tmpfs "{private_dir}" && ' if private_dir else ""
    return ["ip", "netns", "exec", namespace, "unshare", "--uts", "--mount", "--propagation", "private", "sh", "-c",
            f'hostname {name} && {mount}exec "$@"', "sh", *command]


def _launch(hosts, launcher: str, args: list[str], logs: Path, private_dir: Path | None = None) -> list[subprocess.Popen]:
    """One launcher per host, in its own session (so a whole host can be killed)."""
    port = str(free_port())
    master = hosts[0][1]
    hostfile = logs / "hostfile"
    hostfile.write_text("host-a slots=1\nhost-b slots=1\n")
    jobs = []
    for node, (host, name) in enumerate(zip(hosts, ("host-a", "host-b"))):
        if launcher == "deepspeed":
            command = ["deepspeed", "--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(node),
                       "--master_addr", master, "--master_port", port, *args]
        else:
            command = ["torchrun", "--nnodes", "2", "--node_rank", str(node), "--nproc_per_node", "1",
                       "--master_addr", master, "--master_port", port, *args]
        log = (logs / f"{name}.log").open("w")
        jobs.append(subprocess.Popen(_on_host(host, name, command, private_dir if node == 1 else None), cwd=REPO,
                                     env=_env(host[2]), stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
    return jobs


def _wait(jobs, logs: Path, timeout: float = 600) -> list[int]:
    try:
        return [job.wait(timeout=timeout) for job in jobs]
    finally:
        for job in jobs:
            if job.poll() is None:
                os.killpg(job.pid, signal.SIGKILL)


def _log(logs: Path, name: str) -> str:
    return (logs / f"{name}.log").read_text()


def _errors(text: str) -> list[str]:
    return [line[line.index("error: "):] for line in text.splitlines() if "error: " in line]


def _adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def single_host(inputs):
    """The same job as 2 ranks on one host: the adapter the two-host runs must reproduce bit for bit."""
    out = inputs[0] / "single-host"
    proc = subprocess.run(["deepspeed", "--num_gpus", "2", "--master_port", str(free_port()),
                           *_train_args(inputs, out)], cwd=REPO, env=_env(), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return _adapter(out)


def _assert_same(want: dict, got: dict) -> None:
    assert want.keys() == got.keys()
    for key in want:
        assert torch.equal(want[key], got[key]), key


def test_a_job_on_two_hosts_with_a_shared_directory_trains_saves_and_matches_one_host(inputs, hosts, single_host):
    out, logs = inputs[0] / "shared", inputs[0] / "shared-logs"
    logs.mkdir()
    codes = _wait(_launch(hosts, "deepspeed", _train_args(inputs, out), logs), logs)
    assert codes == [0, 0], _log(logs, "host-a")[-3000:] + _log(logs, "host-b")[-3000:]
    assert (out / "checkpoints" / "latest").read_text() == f"step-{STEPS}"
    _assert_same(single_host, _adapter(out))


def test_node_local_output_directories_are_refused_in_one_line_within_seconds(inputs, hosts):
    out, logs = inputs[0] / "node-local", inputs[0] / "node-local-logs"
    out.mkdir()
    logs.mkdir()
    started = time.monotonic()
    codes = _wait(_launch(hosts, "torchrun", _train_args(inputs, out), logs, private_dir=out), logs, timeout=120)
    took = time.monotonic() - started
    assert codes[0] != 0 and codes[1] != 0
    refusal = (f"error: --output_dir {out} is not one directory for every node: rank 1 (host-b) cannot see the file "
               "rank 0 (host-a) wrote there. Checkpoints need --output_dir on storage every node sees")
    for name in ("host-a", "host-b"):
        errors = _errors(_log(logs, name))
        assert len(errors) == 1 and errors[0].startswith(refusal), _log(logs, name)[-3000:]
    assert not (out / "checkpoints").exists() and not (out / "metrics.jsonl").exists()
    assert took < 60, f"the refusal took {took:.0f} s"


def test_a_host_killed_mid_run_stops_the_other_and_both_resume_to_the_same_adapter(inputs, hosts, single_host):
    out, logs = inputs[0] / "killed", inputs[0] / "killed-logs"
    logs.mkdir()
    jobs = _launch(hosts, "deepspeed", _train_args(inputs, out, "--ddp_timeout", str(TIMEOUT_S)), logs)
    try:
        deadline = time.monotonic() + 600
        while not (out / "checkpoints" / f"step-{SAVE_EVERY}").is_dir():
            assert all(job.poll() is None for job in jobs), _log(logs, "host-a")[-2000:]
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert all(job.poll() is None for job in jobs), "the run ended before a host could be killed"
        os.killpg(jobs[1].pid, signal.SIGKILL)
        killed = time.monotonic()
        code = jobs[0].wait(timeout=TIMEOUT_S + 60)
        took = time.monotonic() - killed
    finally:
        _wait(jobs, logs, timeout=1)
    assert code != 0 and took <= TIMEOUT_S + 15, f"host a took {took:.0f} s to stop (exit code {code})"
    errors = _errors(_log(logs, "host-a"))
    assert len(errors) == 1 and "rank 1 stopped responding" in errors[0], _log(logs, "host-a")[-3000:]
    assert not (out / "adapter").exists()

    logs = inputs[0] / "resumed-logs"
    logs.mkdir()
    codes = _wait(_launch(hosts, "deepspeed", _train_args(inputs, out, "--resume"), logs), logs)
    assert codes == [0, 0], _log(logs, "host-a")[-3000:] + _log(logs, "host-b")[-3000:]
    _assert_same(single_host, _adapter(out))
