"""The package as users get it: bad flags answered before the heavy libraries load, and a wheel that
installs and trains from outside the checkout with its own default DeepSpeed config."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest

from tests.models import write_dataset

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "deepspeed", "transformers", "datasets", "peft")


@pytest.mark.parametrize("flags, message", [
    (["--density", "0"], "--density 0.0 is outside (0, 1]"),
    (["--peft", "adapters"], "unknown --peft 'adapters'"),
    (["--config", "missing.yaml"], "--config missing.yaml does not exist"),
])
def test_a_bad_flag_is_answered_before_torch_deepspeed_or_transformers_load(flags, message):
    probe = ("import runpy, sys\n"
             "sys.argv = ['launch/train.py', *sys.argv[1:]]\n"
             "try:\n"
             "    runpy.run_path('launch/train.py', run_name='__main__')\n"
             "except SystemExit as end:\n"
             f"    print(sorted(m for m in {HEAVY!r} if m in sys.modules), end.code)\n")
    proc = subprocess.run([sys.executable, "-c", probe, *flags], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.stdout.split("\n")[0] == "[] 2", proc.stdout + proc.stderr
    assert proc.stderr.count("\n") == 1 and message in proc.stderr


def _copy_checkout(dest: Path) -> Path:
    """The tracked sources (the package, its link to ds_configs/, pyproject), so that building leaves the
    checkout untouched."""
    dest.mkdir()
    for name in ("speft_ds", "ds_configs"):
        shutil.copytree(REPO / name, dest / name, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, dest / name)
    return dest


def test_the_wheel_installs_and_trains_from_outside_the_checkout(tmp_path):
    source = _copy_checkout(tmp_path / "source")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", str(source),
                    "-w", str(tmp_path / "dist")], check=True, capture_output=True, timeout=300)
    wheel = next((tmp_path / "dist").glob("speft_ds-*.whl"))
    # The venv sees this machine's torch, DeepSpeed and the rest; only speft-ds itself comes from the wheel.
    venv.create(tmp_path / "venv", system_site_packages=True, with_pip=False)
    python = tmp_path / "venv" / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "-q", str(wheel)],
                   check=True, capture_output=True, timeout=300)
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": ""}
    where = subprocess.run([str(python), "-c", "import json, speft_ds.config as c; print(json.dumps("
                            "[c.__file__, str(c.SHIPPED_DS_CONFIG), str(c.EMBEDDED_MODEL)]))"],
                           cwd=work, env=env, capture_output=True, text=True, check=True)
    module, ds_config, tiny_model = json.loads(where.stdout.splitlines()[-1])
    assert module.startswith(str(tmp_path / "venv")) and Path(ds_config).is_file(), where.stdout

    # The default --ds_config: the one the wheel carries.
    proc = subprocess.run([str(python), "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--module",
                           "speft_ds.train", "--model", tiny_model, "--dataset", str(write_dataset(work / "d.jsonl", 24)),
                           "--max_steps", "1", "--micro_batch_size", "2", "--seq_len", "48", "--calibration_examples",
                           "4", "--eval_task", "none", "--output_dir", str(work / "out")],
                          cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (work / "out" / "adapter" / "adapter_model.safetensors").is_file()
    assert (work / "out" / "run_config.yaml").is_file() and (work / "out" / "adapter" / "run_config.yaml").is_file()

    # The console scripts point into the installed package.
    plan = subprocess.run([str(tmp_path / "venv" / "bin" / "speft-plan"), "--model", "llama-7b", "--world_size", "8"],
                          cwd=work, env=env, capture_output=True, text=True, timeout=120)
    assert plan.returncode == 0 and plan.stdout.startswith("model llama-7b: 6.74B parameters"), plan.stderr
