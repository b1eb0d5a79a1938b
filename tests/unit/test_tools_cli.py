"""The tools' refusals and speft-train, before any model loads: evaluate never overwrites a result in silence,
generate names a literal backslash-n, speft-train checks train.py's flags before DeepSpeed's launcher starts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from speft_ds.cli import run_main
from speft_ds.commands.evaluate import main as evaluate_main
from speft_ds.commands.generate import main as generate_main
from speft_ds.commands.launch import split
from speft_ds.config import EMBEDDED_MODEL
from speft_ds.runtime.distributed import free_port

REPO = Path(__file__).resolve().parents[2]


def test_evaluate_never_overwrites_a_result_in_silence(tmp_path, capsys):
    task = tmp_path / "task.jsonl"
    task.write_text(json.dumps({"prompt": "1 + 1 =", "answer": "2"}) + "\n")
    result = tmp_path / "result.json"
    result.write_text("{}")
    argv = ["--model", str(EMBEDDED_MODEL), "--task", str(task), "--output", str(result)]
    assert run_main(evaluate_main, argv) == 2
    assert capsys.readouterr().err.strip() == (f"error: --output {result} exists: pass another file, or --overwrite "
                                               "to replace it")
    assert result.read_text() == "{}"


def test_generate_names_a_literal_backslash_n_before_loading_anything(tmp_path, capsys):
    argv = ["--model", str(EMBEDDED_MODEL), "--adapter", str(tmp_path / "none"), "--prompt", "Question: 2 + 2?\\nAnswer:"]
    assert run_main(generate_main, argv) == 2
    assert capsys.readouterr().err.startswith("error: --prompt holds a literal \\n, not a newline")


def test_speft_train_splits_the_launcher_s_flags_from_the_job_s():
    assert split(["--num_gpus", "2", "--model", "m", "--no_ssh", "--master_port=29501", "--density", "0.1"]) == (
        ["--num_gpus", "2", "--no_ssh", "--master_port=29501"], ["--model", "m", "--density", "0.1"])
    assert split(["-H", "hosts", "--force_multi", "--launcher", "slurm", "--launcher_args", "-p gpu", "--seq_len",
                  "64"]) == (["-H", "hosts", "--force_multi", "--launcher", "slurm", "--launcher_args", "-p gpu"],
                             ["--seq_len", "64"])


def test_speft_train_checks_the_flags_then_starts_deepspeed_over_the_job(tmp_path):
    run = [sys.executable, "-c", "import sys; from speft_ds.commands import train; sys.exit(train())"]
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    bad = subprocess.run([*run, "--num_gpus", "1", "--lr", "1"], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode == 2 and bad.stderr.strip() == "error: unknown flag --lr: did you mean --learning_rate? " \
                                                         "(see --help)"
    good = subprocess.run([*run, "--num_gpus", "1", "--master_port", str(free_port()), "--model", str(EMBEDDED_MODEL),
                           "--output_dir", str(tmp_path / "out"), "--dry_run"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert good.returncode == 0, good.stderr[-2000:]
    assert "plan: fits" in good.stdout and "launcher.launch" in good.stderr + good.stdout  # DeepSpeed's launcher ran it
