"""Checkpoints: a run killed with SIGKILL after a checkpoint and resumed ends bitwise where an uninterrupted
run ends (fp32 on CPU, 2 ranks under the DeepSpeed launcher, SPEFT's dynamic drop/regrow masks, LoRA, and
RoseLoRA's importance scores and pruning included); resumed on 1 or 4 ranks, or from 1 rank on 2, it ends
within float rounding of the uninterrupted 2-rank run, with the same sparsity pattern."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from speft_ds.config import ConfigError, TrainConfig
from speft_ds.methods.lora.method import LoraMethod
from speft_ds.runtime.checkpoint import find
from speft_ds.runtime.resume_checks import keep_checkpoint_batches
from speft_ds.runtime.distributed import free_port
from tests.models import write_dataset, write_tiny_llama

REPO = Path(__file__).resolve().parents[1]
STEPS, SAVE_EVERY = 8, 2
# A global batch of 8 = 2 ranks x micro-batches of 2 x 2 accumulation steps, which 1 and 4 ranks can keep. The
# 43 training examples make 5 steps an epoch: the runs cross an epoch boundary.
MICRO_BATCH, ACCUMULATION = 2, 2
SPEFT_FLAGS = ("--mask_update_steps", "4", "--mask_update", "drop_regrow", "--regrow_fraction", "0.25")
# RoseLoRA prunes from step 3 on: a kill after the step-2 checkpoint resumes into the schedule
LORA_FLAGS = ("--lora_r", "4")
ROSE_FLAGS = (*LORA_FLAGS, "--rose_start", "0.25", "--rose_end", "0.75", "--rose_sparsity", "0.75")
# The runs by name: the method and its flags ("speft-scaled": a static mask trained as scales x values).
# LoRA trains with dropout: a resume that did not restore the RNG states would draw other masks.
MASK = ("--calibration_examples", "16", "--density", "0.05")
RUNS = {"speft": ("speft", (*MASK, *SPEFT_FLAGS)), "speft-scaled": ("speft", (*MASK, "--delta_scaling", "input_channel")),
        "lora": ("lora", (*LORA_FLAGS, "--lora_dropout", "0.1")), "roselora": ("roselora", ROSE_FLAGS),
        # LoRA alone for 4 steps, then with 600 sparse entries
        "rosa": ("rosa", (*LORA_FLAGS, "--num_trainable", "600", "--calibration_examples", "16", "--rosa_start", "0.5"))}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    model_dir = write_tiny_llama(root / "llama")
    dataset = root / "data.jsonl"
    write_dataset(dataset, 48)
    return root, model_dir, dataset


def _command(model_dir: Path, dataset: Path, out: Path, *extra: str, peft: str = "speft", ranks: int = 2,
             accumulation: int = ACCUMULATION) -> list[str]:
    return ["deepspeed", "--num_gpus", str(ranks), "--master_port", str(free_port()), "launch/train.py",
            "--model", str(model_dir), "--dataset", str(dataset), "--output_dir", str(out),
            "--max_steps", str(STEPS), "--save_steps", str(SAVE_EVERY), "--micro_batch_size", str(MICRO_BATCH),
            "--gradient_accumulation_steps", str(accumulation),
            "--learning_rate", "1e-2", "--warmup_steps", "2",
            "--seq_len", "48", "--logging_steps", "1", "--val_size", "0.1", "--peft", RUNS[peft][0],
            *RUNS[peft][1], *extra]


def _env():
    return {**os.environ, "DS_ACCELERATOR": "cpu"}


def _steps_logged(out: Path) -> list[int]:
    path = out / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines()
            if line.strip() and "step" in json.loads(line) and "event" not in json.loads(line)]


def _adapter(out: Path) -> dict[str, torch.Tensor]:
    """The adapter's tensors (RoSA's two parts' keys prefixed with the part)."""
    adapter = out / "adapter"
    if (adapter / "lora").is_dir():
        return {f"{part}/{key}": t for part in ("lora", "sparse")
                for key, t in load_file(str(adapter / part / "adapter_model.safetensors")).items()}
    return load_file(str(adapter / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def straight_runs(inputs):
    """straight_runs(peft): the output directory of that method's uninterrupted 2-rank run, run once, when
    first asked for."""
    root, model_dir, dataset = inputs
    runs = {}

    def get(peft: str) -> Path:
        if peft not in runs:
            out = root / f"straight-{peft}"
            proc = subprocess.run(_command(model_dir, dataset, out, peft=peft), cwd=REPO, capture_output=True,
                                  text=True, env=_env(), timeout=600)
            assert proc.returncode == 0, proc.stderr[-3000:]
            runs[peft] = out
        return runs[peft]
    return get


@pytest.fixture(scope="module")
def straight(straight_runs) -> Path:
    return straight_runs("speft")


def _assert_same_adapter(want: Path, got: Path, context: str) -> None:
    want, got = _adapter(want), _adapter(got)
    assert want.keys() == got.keys()
    for key in want:
        assert torch.equal(want[key], got[key]), f"{key} differs {context}"


def _resume(model_dir: Path, dataset: Path, out: Path, *extra: str, peft: str = "speft", ranks: int = 2,
            accumulation: int = ACCUMULATION, resume: tuple[str, ...] = ("--resume",)) -> str:
    """Resume the run in `out`; returns its output."""
    resumed = subprocess.run(_command(model_dir, dataset, out, *extra, *resume, peft=peft, ranks=ranks,
                                      accumulation=accumulation),
                             cwd=REPO, capture_output=True, text=True, env=_env(), timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-4000:]
    return resumed.stdout


def _run_until_checkpoint(command: list[str], out: Path, step: int) -> None:
    """Start the run and SIGKILL its whole process group once checkpoint step-`step` is complete: the tag
    appears only when every rank has written it (renamed from a temporary one). The run still has steps,
    checkpoints, an evaluation and the adapter ahead of it, seconds of work; a run found finished fails
    the test. How far past `step` the kill lands does not matter: the resume starts from step-`step`."""
    job = subprocess.Popen(command, cwd=REPO, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           start_new_session=True)
    deadline = time.monotonic() + 600
    while not (out / "checkpoints" / f"step-{step}").is_dir():
        assert job.poll() is None, f"the run ended (exit code {job.returncode}) before checkpoint step-{step}"
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert job.poll() is None, "the run ended before it could be killed"
    os.killpg(job.pid, signal.SIGKILL)
    job.wait()
    assert not (out / "adapter").exists()


def test_killed_and_resumed_run_ends_bitwise_like_an_uninterrupted_one(inputs, straight):
    _kill_resume_and_compare(inputs, straight, "speft")


@pytest.mark.parametrize("peft", ["lora", "roselora"])
def test_lora_methods_killed_and_resumed_end_bitwise_like_uninterrupted(inputs, straight_runs, peft):
    root, model_dir, dataset = inputs
    _kill_resume_and_compare(inputs, straight_runs(peft), peft)
    wrong = subprocess.run(_command(model_dir, dataset, root / f"interrupted-{peft}", "--resume",
                                    "--overwrite_output_dir"), cwd=REPO,
                           capture_output=True, text=True, env=_env(), timeout=300)
    assert wrong.returncode == 2 and f"checkpoint of --peft {peft}" in wrong.stderr


def _kill_resume_and_compare(inputs, straight: Path, peft: str) -> None:
    root, model_dir, dataset = inputs
    interrupted = root / f"interrupted-{peft}"
    _run_until_checkpoint(_command(model_dir, dataset, interrupted, peft=peft), interrupted, SAVE_EVERY)

    _resume(model_dir, dataset, interrupted, peft=peft,
            resume=("--resume", str(interrupted / "checkpoints" / f"step-{SAVE_EVERY}")))
    _assert_same_adapter(straight, interrupted, f"after a kill past checkpoint step-{SAVE_EVERY}")
    assert _steps_logged(interrupted) == list(range(1, STEPS + 1))
    tags = sorted(p.name for p in (interrupted / "checkpoints").iterdir() if p.is_dir())
    assert tags == [f"step-{s}" for s in range(SAVE_EVERY, STEPS + 1, SAVE_EVERY)]  # no temporary tag left
    assert (interrupted / "checkpoints" / "latest").read_text() == f"step-{STEPS}"


def _copy_checkpoint(run: Path, out: Path, step: int) -> Path:
    """`out` as the run in `run` would have left it, killed after its checkpoint step-`step` (its own
    metrics.jsonl included: the resume cuts it after that step)."""
    shutil.copytree(run / "checkpoints" / f"step-{step}", out / "checkpoints" / f"step-{step}")
    (out / "checkpoints" / "latest").write_text(f"step-{step}")
    shutil.copy(run / "metrics.jsonl", out / "metrics.jsonl")
    return out


def _assert_close_adapter(want: Path, got: Path, context: str) -> None:
    """The same sparsity (SPEFT's indices, the zeros RoseLoRA's pruning left) and values within rounding:
    another number of ranks adds the same gradients in another order (seen: at most 1.5e-8 apart)."""
    want, got = _adapter(want), _adapter(got)
    assert want.keys() == got.keys()
    for key in want:
        if not want[key].is_floating_point():
            assert torch.equal(want[key], got[key]), f"{key} differs {context}"
            continue
        assert torch.equal(want[key] == 0, got[key] == 0), f"{key}'s zeros differ {context}"
        torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=1e-6, msg=f"{key} differs {context}")


def _assert_derived(output: str, written_on: int, accumulation: int, ranks: int) -> None:
    """Rank 0 printed, once, the accumulation that keeps the checkpoint's global batch on `ranks` ranks."""
    global_batch = written_on * MICRO_BATCH * accumulation
    line = (f"resume: global batch {global_batch} as in the checkpoint ({written_on} ranks x {MICRO_BATCH} x "
            f"{accumulation}); on {ranks} ranks: gradient_accumulation_steps {global_batch // (MICRO_BATCH * ranks)}")
    assert output.count("resume: global batch") == 1 and line in output, output[-3000:]


@pytest.mark.parametrize("ranks", [1, 4])
def test_resumed_on_another_number_of_ranks_ends_like_the_uninterrupted_run(inputs, straight, ranks):
    """From the 2-rank checkpoint at step 2, before the drop/regrow at step 4, which the new ranks run."""
    root, model_dir, dataset = inputs
    out = _copy_checkpoint(straight, root / f"on-{ranks}-ranks", SAVE_EVERY)
    _assert_derived(_resume(model_dir, dataset, out, ranks=ranks), 2, ACCUMULATION, ranks)
    _assert_close_adapter(straight, out, f"resumed on {ranks} ranks")
    assert _steps_logged(out) == list(range(1, STEPS + 1))


def test_resumed_after_a_mask_update_on_one_rank_ends_like_the_uninterrupted_run(inputs, straight):
    """From step 6, after the drop/regrow at step 4 folded deltas into the base: each rank reads the folded
    entries of its own shards from the saved ranks whose shards overlap it."""
    root, model_dir, dataset = inputs
    out = _copy_checkpoint(straight, root / "after-update-on-1-rank", 6)
    _resume(model_dir, dataset, out, ranks=1)
    _assert_close_adapter(straight, out, "resumed after a mask update on 1 rank")


def test_a_one_rank_run_resumed_on_two_ends_like_the_two_rank_run(inputs, straight):
    root, model_dir, dataset = inputs
    out = root / "from-1-rank"
    accumulation = 2 * ACCUMULATION  # the same global batch on 1 rank
    _run_until_checkpoint(_command(model_dir, dataset, out, ranks=1, accumulation=accumulation), out, SAVE_EVERY)
    # The command of the 1-rank run, on 2 ranks: its --gradient_accumulation_steps gives way to the derived one.
    output = _resume(model_dir, dataset, out, accumulation=accumulation,
                     resume=("--resume", str(out / "checkpoints" / f"step-{SAVE_EVERY}")))
    _assert_derived(output, 1, accumulation, 2)
    _assert_close_adapter(straight, out, "from 1 rank resumed on 2")
    assert _steps_logged(out) == list(range(1, STEPS + 1))


def test_roselora_resumed_on_one_rank_ends_like_the_uninterrupted_run(inputs, straight_runs):
    """Its sensitivity scores cross over, and its pruning from step 3 on lands on the same entries."""
    root, model_dir, dataset = inputs
    straight = straight_runs("roselora")
    out = _copy_checkpoint(straight, root / "roselora-on-1-rank", SAVE_EVERY)
    _assert_derived(_resume(model_dir, dataset, out, peft="roselora", ranks=1), 2, ACCUMULATION, 1)
    _assert_close_adapter(straight, out, "resumed on 1 rank")


def test_channel_scaled_deltas_resumed_on_one_rank_end_like_the_uninterrupted_run(inputs, straight_runs):
    """--delta_scaling input_channel: the per-channel scales come back from the checkpoint (no salience pass
    on resume), so the values train on as they would have."""
    root, model_dir, dataset = inputs
    straight = straight_runs("speft-scaled")
    out = _copy_checkpoint(straight, root / "scaled-on-1-rank", SAVE_EVERY)
    _resume(model_dir, dataset, out, peft="speft-scaled", ranks=1)
    events = [json.loads(line).get("event") for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert events.count("salience") == 1  # the first run's: the resume scored nothing again
    _assert_close_adapter(straight, out, "resumed on 1 rank")


@pytest.mark.parametrize("step", [2, 6], ids=["before the switch", "after it"])
def test_rosa_resumed_on_one_rank_across_or_after_its_switch_ends_like_the_uninterrupted_run(inputs, straight_runs,
                                                                                            step):
    """Before step 4 the resumed run chooses the sparse part itself; after it, the mask comes from the
    checkpoint's slices."""
    root, model_dir, dataset = inputs
    straight = straight_runs("rosa")
    out = _copy_checkpoint(straight, root / f"rosa-from-{step}-on-1-rank", step)
    _resume(model_dir, dataset, out, peft="rosa", ranks=1)
    _assert_close_adapter(straight, out, f"resumed from step {step} on 1 rank")


def test_a_global_batch_the_ranks_cannot_split_is_refused_before_training(inputs, straight, tmp_path):
    root, model_dir, dataset = inputs
    out = _copy_checkpoint(straight, tmp_path / "on-3-ranks", SAVE_EVERY)
    proc = subprocess.run(_command(model_dir, dataset, out, "--resume", ranks=3), cwd=REPO, capture_output=True,
                          text=True, env=_env(), timeout=300)
    errors = [line[line.index("error: "):] for line in (proc.stdout + proc.stderr).splitlines() if "error: " in line]
    assert proc.returncode == 2 and errors == [
        "error: --resume: the checkpoint was trained on 2 ranks x micro-batches of 2 x 2 accumulation steps (global "
        "batch 8), which 3 ranks cannot split into whole micro-batches: resume on a number of ranks that divides 4"
    ], proc.stdout[-2000:] + proc.stderr[-2000:]
    assert (out / "metrics.jsonl").read_bytes() == (straight / "metrics.jsonl").read_bytes()  # nothing ran


LAYOUT = {"world_size": 2, "micro_batch_size": 2, "gradient_accumulation_steps": 2}


@pytest.mark.parametrize("ranks,derived", [(1, 4), (2, 2), (4, 1)])
def test_the_accumulation_is_derived_from_the_checkpoints_global_batch(ranks, derived):
    config = TrainConfig(model="m", dataset="d", micro_batch_size=2, gradient_accumulation_steps=2)
    kept, ds_config, note = keep_checkpoint_batches(config, {"gradient_accumulation_steps": 2}, LAYOUT, ranks, [])
    assert kept.gradient_accumulation_steps == derived and ds_config["gradient_accumulation_steps"] == "auto"
    assert (note is None) == (ranks == 2)


@pytest.mark.parametrize("micro_batch,ranks,randomness,message", [
    (4, 2, [], "resume with --micro_batch_size 2, which keeps its micro-batches"),
    (2, 3, [], "which 3 ranks cannot split into whole micro-batches: resume on a number of ranks that divides 4"),
    (2, 1, ["--lora_dropout 0.1"], "--lora_dropout 0.1 draws per micro-batch on each rank, which 1 ranks cannot "
                                   "replay: resume on 2 ranks"),
])
def test_a_resume_that_cannot_keep_the_batches_is_refused(micro_batch, ranks, randomness, message):
    config = TrainConfig(model="m", dataset="d", micro_batch_size=micro_batch)
    with pytest.raises(ConfigError, match=re.escape(message)):
        keep_checkpoint_batches(config, {}, LAYOUT, ranks, randomness)


def test_lora_dropout_is_the_randomness_that_cannot_cross_world_sizes():
    assert LoraMethod.randomness_per_micro_batch(TrainConfig(model="m", dataset="d", lora_dropout=0.1)) == [
        "--lora_dropout 0.1"]
    assert LoraMethod.randomness_per_micro_batch(TrainConfig(model="m", dataset="d")) == []


def test_checkpoint_size_grows_with_k_and_holds_no_base_weights(inputs):
    root, model_dir, dataset = inputs
    sizes = {}
    for density in ("0.01", "0.2"):
        out = root / f"density-{density}"
        proc = subprocess.run(_command(model_dir, dataset, out, "--density", density, "--max_steps", "2",
                                       "--save_total_limit", "1"),
                              cwd=REPO, capture_output=True, text=True, env=_env(), timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        tags = [p for p in (out / "checkpoints").iterdir() if p.is_dir()]
        assert [p.name for p in tags] == ["step-2"]
        sizes[density] = sum(f.stat().st_size for f in tags[0].rglob("*") if f.is_file())
    base_bytes = (model_dir / "model.safetensors").stat().st_size
    k_bytes = 0.2 * base_bytes  # the trainable values are about density x the base's weights
    assert sizes["0.2"] > sizes["0.01"] + 0.5 * k_bytes  # grows with k (values + two AdamW moments)
    assert sizes["0.01"] < 0.5 * base_bytes  # no frozen base weights inside


def test_resume_needs_a_checkpoint_of_this_output_dir(inputs, tmp_path):
    root, model_dir, dataset = inputs
    proc = subprocess.run(_command(model_dir, dataset, tmp_path / "fresh", "--resume"), cwd=REPO,
                          capture_output=True, text=True, env=_env(), timeout=300)
    assert proc.returncode == 2 and "no checkpoint" in proc.stderr


def test_a_checkpoint_in_deepspeeds_pickled_files_is_refused_in_one_line(tmp_path):
    """Checkpoints of speft-ds before per-rank slices: DeepSpeed's files plus a state file without the engine's."""
    step = tmp_path / "checkpoints" / "step-2"
    step.mkdir(parents=True)
    save_file({"rng/torch": torch.get_rng_state()}, str(step / "speft_state.safetensors"),
              metadata={"step": "2", "method": "speft"})
    (tmp_path / "checkpoints" / "latest").write_text("step-2")
    with pytest.raises(ConfigError, match="written by an older speft-ds, in DeepSpeed's pickled files: resume it"):
        find(tmp_path, "latest", "speft")


def test_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(inputs):
    root, model_dir, dataset = inputs
    out = root / "diverges"
    # An absurd learning rate makes the deltas overflow after the first update.
    proc = subprocess.run(_command(model_dir, dataset, out, "--learning_rate", "1e38", "--save_steps", "1",
                                   "--max_grad_norm", "0"),
                          cwd=REPO, capture_output=True, text=True, env=_env(), timeout=600)
    assert proc.returncode == 1, proc.stderr[-3000:]
    # Ranks share the launcher's pipes, so another rank's output may precede the message on its line.
    errors = [line[line.index("error: "):] for line in (proc.stdout + proc.stderr).splitlines() if "error: " in line]
    assert len(errors) == 1 and "loss is not finite" in errors[0], proc.stdout[-2000:] + proc.stderr[-2000:]
    assert not (out / "adapter").exists()
    good = (out / "checkpoints" / "latest").read_text()
    bad_step = int(errors[0].split("step ")[1].split(":")[0])
    assert good == f"step-{bad_step - 1}" and (out / "checkpoints" / good / "speft_state.safetensors").is_file()


def _checkpoint_dirs(out: Path) -> list[str]:
    try:
        return [entry.name for entry in os.scandir(out / "checkpoints") if entry.is_dir()]
    except FileNotFoundError:
        return []


def test_a_kill_during_a_save_leaves_the_previous_checkpoint_resumable(inputs, straight):
    root, model_dir, dataset = inputs
    out = root / "killed-while-saving"
    job = subprocess.Popen(_command(model_dir, dataset, out, "--save_steps", "1"), cwd=REPO, env=_env(),
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    # Poll fast: a save of the tiny model takes a fraction of a second, and each step from 3 on saves once.
    while not any(name.startswith(".tmp-step-") and name != ".tmp-step-1" and name != ".tmp-step-2"
                  for name in _checkpoint_dirs(out)):
        assert job.poll() is None, "the run ended before a save could be interrupted"
        time.sleep(0.001)
    os.killpg(job.pid, signal.SIGKILL)
    job.wait()
    saving = next(name for name in _checkpoint_dirs(out) if name.startswith(".tmp-step-"))
    latest = (out / "checkpoints" / "latest").read_text()
    assert latest == f"step-{int(saving.rsplit('-', 1)[1]) - 1}"  # the previous one, complete
    assert (out / "checkpoints" / latest / "speft_state.safetensors").is_file()

    _resume(model_dir, dataset, out, "--save_steps", "1")
    _assert_same_adapter(straight, out, f"after a kill while writing {saving}")
    assert not any(name.startswith(".tmp") for name in _checkpoint_dirs(out))


def _pages(path: Path) -> int:
    return -(-path.stat().st_size // 4096) * 4096  # tmpfs allocates whole pages


@pytest.mark.parametrize("fails_in", ["rank files", "state"])
def test_a_full_disk_fails_the_save_loudly_and_keeps_the_previous_checkpoint(inputs, straight, tmp_path, fails_in):
    """The output directory lives on a tmpfs (mounted in a private user and mount namespace, so no root is
    needed) sized so that the second save runs out of space in the ranks' files or, after them, in rank 0's
    state file."""
    root, model_dir, dataset = inputs
    checkpoints = straight / "checkpoints"
    # What the run holds after its first save, plus a page for metrics.jsonl to grow.
    first = sum(_pages(f) for f in [straight / "metrics.jsonl", *checkpoints.glob("*"),
                                    *(checkpoints / f"step-{SAVE_EVERY}").iterdir()] if f.is_file()) + 4096
    rank_files = sum(_pages(f) for f in (checkpoints / f"step-{2 * SAVE_EVERY}").glob("rank-*"))
    size = first + (4096 if fails_in == "rank files" else rank_files)
    mount, kept = tmp_path / "small-disk", tmp_path / "kept"
    mount.mkdir()
    # The tmpfs vanishes with the namespace: copy what the run left there out before leaving it.
    script = ('size=$1 mnt=$2 keep=$3; shift 3; mount -t tmpfs -o size=$size tmpfs $mnt && "$@"; status=$?; '
              'cp -a $mnt/out $keep; exit $status')
    proc = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script, "sh",
                           str(int(size)), str(mount), str(kept), *_command(model_dir, dataset, mount / "out")],
                          cwd=REPO, capture_output=True, text=True, env=_env(), timeout=600)
    assert proc.returncode == 1, proc.stderr[-3000:]
    errors = [line[line.index("error: "):] for line in (proc.stdout + proc.stderr).splitlines() if "error: " in line]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert errors[0].startswith(f"error: saving checkpoint step-{2 * SAVE_EVERY} failed") \
        and f"step-{SAVE_EVERY} is kept" in errors[0], errors[0]
    # rank 0 names its own error (its rank file's OSError, or safetensors' for the state file), or says the save
    # failed on another rank
    named = ("No space left on device", "on another rank") if fails_in == "rank files" else ("SafetensorError",)
    assert any(cause in errors[0] for cause in named), errors[0]
    assert not (kept / "adapter").exists()
    assert _checkpoint_dirs(kept) == [f"step-{SAVE_EVERY}"]  # no partial checkpoint left
    assert (kept / "checkpoints" / "latest").read_text() == f"step-{SAVE_EVERY}"

    _resume(model_dir, dataset, kept)  # on a disk with room, from the kept checkpoint
    _assert_same_adapter(straight, kept, "after a save failed for lack of space")
