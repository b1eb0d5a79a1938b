"""One job, however a cluster starts it.

Two DeepSpeed launchers as two nodes on loopback (`--no_ssh --node_rank`), torchrun (launch/torchrun.sh)
and mpiexec (MPICH's wheel, mpi4py discovery) train the same adapter bit for bit (same seed, data and
world size); 1, 2 and 4 ranks select the same mask but for near-ties, judged against a dense
single-process salience reference; the SLURM script produces the launcher commands and hostfile it should.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from speft_ds.config import TrainConfig
from speft_ds.data.batches import tokenize_dataset
from speft_ds.data.sources import load_raw_dataset
from speft_ds.methods.speft.adapter_format import read_adapter
from speft_ds.models.loading import load_tokenizer
from speft_ds.runtime.distributed import free_port
from tests.models import tiny_job
from tests.references import decoder_linears, dense_gradient, plain_permutation, plain_split

REPO = Path(__file__).resolve().parents[1]
DENSITY, CALIBRATION = 0.05, 16


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return tiny_job(tmp_path_factory.mktemp("launchers"), 64)


def _train_args(inputs, out: Path, steps: int) -> list[str]:
    _, model_dir, dataset = inputs
    return ["--model", str(model_dir), "--dataset", str(dataset), "--output_dir", str(out), "--max_steps", str(steps),
            "--micro_batch_size", "2", "--seq_len", "48", "--calibration_examples", str(CALIBRATION),
            "--density", str(DENSITY), "--learning_rate", "1e-2", "--lr_scheduler", "constant", "--val_size", "0.1",
            "--logging_steps", "1"]


def _env(**extra: str) -> dict[str, str]:
    # One thread per rank under every launcher, so that their runs compare bit for bit.
    return {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", **extra}


def _run(command: list[str], out: Path, **env: str) -> Path:
    proc = subprocess.run(command, cwd=REPO, env=_env(**env), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert (out / "adapter").is_dir(), proc.stderr[-2000:]
    return out / "adapter"


def _two_nodes(inputs, out: Path, steps: int) -> Path:
    """Two DeepSpeed launchers, one per 'node' (two names for this machine), as on a cluster without ssh."""
    root = inputs[0]
    hostfile = root / "hostfile"
    hostfile.write_text("localhost slots=1\n127.0.0.1 slots=1\n")
    port = free_port()
    logs = [root / f"{out.name}-node{node}.log" for node in (0, 1)]
    nodes = [subprocess.Popen(["deepspeed", "--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(node),
                               "--master_addr", "127.0.0.1", "--master_port", str(port), "launch/train.py",
                               *_train_args(inputs, out, steps)],
                              cwd=REPO, env=_env(), stdout=log.open("w"), stderr=subprocess.STDOUT)
             for node, log in zip((0, 1), logs)]
    codes = [node.wait(timeout=900) for node in nodes]
    assert codes == [0, 0], [log.read_text()[-3000:] for log in logs]
    return out / "adapter"


@pytest.fixture(scope="module")
def adapters(inputs):
    """The same 2-rank job under each launcher, plus 1 and 4 ranks (one step: only their masks are compared)."""
    root = inputs[0]
    runs = {"deepspeed, 2 nodes": _two_nodes(inputs, root / "deepspeed", steps=4)}
    out = root / "torchrun"
    runs["torchrun"] = _run(["bash", "launch/torchrun.sh", *_train_args(inputs, out, 4)], out,
                            NPROC_PER_NODE="2", MASTER_PORT=str(free_port()))
    out = root / "mpiexec"
    runs["mpiexec"] = _run(["mpiexec", "-n", "2", "python", "launch/train.py", *_train_args(inputs, out, 4)], out,
                           MASTER_PORT=str(free_port()))
    out = root / "one-rank"
    runs["1 rank"] = _run(["python", "launch/train.py", *_train_args(inputs, out, 1)], out)
    out = root / "four-ranks"
    runs["4 ranks"] = _run(["deepspeed", "--num_gpus", "4", "--master_port", str(free_port()), "launch/train.py",
                            *_train_args(inputs, out, 1)], out)
    return runs


def test_a_two_node_job_trains_and_writes_an_adapter(adapters):
    metrics = adapters["deepspeed, 2 nodes"].parent / "metrics.jsonl"
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["step"] for r in records if "event" not in r] == [1, 2, 3, 4]
    delta = next(r for r in records if r.get("event") == "delta")
    assert len(delta["index_bytes_per_rank"]) == 2  # one rank on each node
    _, values, _ = read_adapter(adapters["deepspeed, 2 nodes"])
    assert all(v.abs().max() > 0 for v in values.values()), "values never moved from zero"


def test_every_launcher_trains_the_same_adapter(adapters):
    reference_indices, reference_values, _ = read_adapter(adapters["deepspeed, 2 nodes"])
    for launcher in ("torchrun", "mpiexec"):
        indices, values, _ = read_adapter(adapters[launcher])
        assert list(indices) == list(reference_indices), launcher
        for name in indices:
            assert torch.equal(indices[name], reference_indices[name]), (launcher, name)
            assert torch.equal(values[name], reference_values[name]), (launcher, name)


def _reference_scores(model_dir: Path, dataset: Path) -> dict[str, torch.Tensor]:
    """|gradient| over the recipe's calibration examples, by plain autograd in one process."""
    config = TrainConfig(model=str(model_dir), dataset=str(dataset), seq_len=48, val_size=0.1)
    train_set = plain_split(tokenize_dataset(load_raw_dataset(config), load_tokenizer(config), config),
                            config.val_size, config.seed)
    examples = [train_set[i] for i in plain_permutation(len(train_set), config.seed)[:CALIBRATION]]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return {name: g.abs() for name, g in dense_gradient(model, examples, decoder_linears(model)).items()}


def test_masks_from_1_2_and_4_ranks_agree_but_for_near_ties(adapters, inputs):
    scores = _reference_scores(inputs[1], inputs[2])
    kth = torch.cat(list(scores.values())).sort(descending=True).values[
        sum(t.numel() for t in read_adapter(adapters["1 rank"])[0].values()) - 1]
    near = {name: (s - kth).abs() <= 1e-4 * kth for name, s in scores.items()}
    masks = {runs: read_adapter(adapters[runs])[0] for runs in ("1 rank", "deepspeed, 2 nodes", "4 ranks")}
    one = masks.pop("1 rank")
    for runs, mask in masks.items():
        assert sum(t.numel() for t in mask.values()) == sum(t.numel() for t in one.values())
        differing = 0
        for name in scores:
            a = set(one.get(name, torch.zeros(0, dtype=torch.int64)).tolist())
            b = set(mask.get(name, torch.zeros(0, dtype=torch.int64)).tolist())
            for index in a ^ b:
                assert near[name][index], f"{runs}: {name}[{index}] is no near-tie of the k-th score"
            differing += len(a ^ b)
        print(f"{runs}: {differing} entries differ from 1 rank's mask "
              f"(near-ties within 1e-4 of the k-th score: {sum(int(n.sum()) for n in near.values())})")


def _stub(directory: Path, name: str, body: str) -> None:
    path = directory / name
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(0o755)


def test_the_slurm_script_starts_one_launcher_per_node_with_the_allocation_s_hostfile(tmp_path):
    script = REPO / "launch" / "slurm.sbatch"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls"
    # scontrol expands the allocation's node list; srun runs its command once per node, as SLURM does;
    # deepspeed records how it was called.
    _stub(bin_dir, "scontrol", '[ "$1 $2" = "show hostnames" ] && [ "$3" = "gpu[07-08]" ] && '
                               'printf "gpu07\\ngpu08\\n"\n')
    _stub(bin_dir, "srun", 'echo "srun $*" >> "$CALLS"\n'
                           'while [ "${1#--}" != "$1" ]; do shift; done\n'
                           'for node in 0 1; do SLURM_NODEID=$node "$@"; done\n')
    _stub(bin_dir, "deepspeed", 'echo "deepspeed $*" >> "$CALLS"\n')
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "CALLS": str(calls), "SLURM_JOB_NODELIST": "gpu[07-08]",
           "SLURM_JOB_ID": "4242", "SLURM_SUBMIT_DIR": str(tmp_path), "SLURM_GPUS_ON_NODE": "4"}
    proc = subprocess.run(["bash", str(script), "--ds_config", "ds_configs/z3_cluster.json", "--model", "/m x"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    hostfile = tmp_path / "hostfile.4242"
    assert hostfile.read_text() == "gpu07 slots=4\ngpu08 slots=4\n"
    calls = calls.read_text()
    assert calls.startswith("srun --ntasks-per-node=1 ")
    launchers = [line for line in calls.splitlines() if line.startswith("deepspeed ")]
    assert launchers == [f"deepspeed --hostfile {hostfile} --no_ssh --node_rank {node} --master_addr gpu07 "
                         "--master_port 29500 launch/train.py --ds_config ds_configs/z3_cluster.json --model /m x"
                         for node in (0, 1)]


def test_the_dockerfile_passes_hadolint():
    assert shutil.which("hadolint"), "hadolint is missing: pip install -e '.[test]'"
    proc = subprocess.run(["hadolint", str(REPO / "docker" / "Dockerfile")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
