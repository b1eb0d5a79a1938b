"""--config FILE: its keys are train.py's flags, the command line overrides it, bad keys and values are one
ConfigError; the resolved configuration written as run_config.yaml reruns to the same configuration."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pytest

from speft_ds.cli import parse_config, read_config_file, write_run_config
from speft_ds.config import EMBEDDED_MODEL, SHIPPED_DS_CONFIG, ConfigError
from speft_ds.runtime.ds_config import fill_auto, read_ds_config, reconcile
from tests.models import write_dataset

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((REPO / "examples").glob("*.yaml"))
TINY = ["--model", str(EMBEDDED_MODEL)]


def test_the_file_sets_flags_and_the_command_line_wins(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(f"model: {EMBEDDED_MODEL}\ndensity: 0.02\nlearning_rate: 1e-4\ngradient_checkpointing: true\n"
                    "seq_len: 64\ntext_field: null\n")
    config, explicit = parse_config(["--config", str(path), "--seq_len", "96"])
    assert (config.density, config.learning_rate, config.gradient_checkpointing, config.seq_len) == (0.02, 1e-4, True, 96)
    assert config.text_field is None
    # Explicit settings (file and command line) are what plan_run reconciles with the DeepSpeed config.
    assert explicit == {"model", "density", "learning_rate", "gradient_checkpointing", "seq_len"}


def test_json_files_are_read_too(tmp_path):
    path = tmp_path / "run.json"
    path.write_text(f'{{"model": "{EMBEDDED_MODEL}", "peft": "lora", "lora_r": 4}}')
    config, _ = parse_config(["--config", str(path)])
    assert (config.peft, config.lora_r) == ("lora", 4)


@pytest.mark.parametrize("text, message", [
    ("densty: 0.01\n", "unknown key 'densty': did you mean density?"),
    ("zzz_unrelated: 1\n", "unknown key 'zzz_unrelated': its keys are train.py's flag names"),
    ("density: lots\n", "argument --density: invalid float value: 'lots'"),
    ("peft: adapters\n", "unknown --peft 'adapters': choose one of speft, roselora, lora"),
    ("density: 0\n", "--density 0.0 is outside (0, 1]"),
    ("density: [0.01, 0.02]\n", "density must be a single value"),
    ("num_train_epoch: 2\n", "unknown key 'num_train_epoch': did you mean epochs?"),
    ("stage: sft\n", "stage: speft-ds trains supervised fine-tuning only (LLaMA-Factory's --stage sft): drop it"),
    ("- density\n", "must map flag names to values"),
    ("density: [0.01\n", "is not valid YAML or JSON"),
])
def test_a_bad_file_is_one_error_naming_the_problem(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        parse_config(["--config", str(path), *TINY])
    assert message in str(err.value) and "\n" not in str(err.value)


def test_hf_and_llama_factory_keys_yaml_lists_and_resume_true_are_read(tmp_path):
    path = tmp_path / "hf.yaml"
    path.write_text(f"model_name_or_path: {EMBEDDED_MODEL}\nnum_train_epochs: 2\nper_device_train_batch_size: 4\n"
                    "lora_target: [q_proj, v_proj]\npeft: lora\nlora_rank: 2\ncutoff_len: 64\n"
                    "lr_scheduler_type: constant_with_warmup\nresume_from_checkpoint: true\n")
    config, explicit = parse_config(["--config", str(path)])
    assert (config.epochs, config.micro_batch_size, config.target_modules, config.lora_r, config.seq_len,
            config.lr_scheduler, config.resume) == (2.0, 4, "q_proj,v_proj", 2, 64, "constant_with_warmup", "latest")
    assert {"epochs", "micro_batch_size", "target_modules", "lora_r", "seq_len", "resume"} <= explicit


def test_a_missing_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        parse_config(["--config", str(tmp_path / "nope.yaml")])


def test_run_config_reruns_to_the_same_configuration(tmp_path):
    config, _ = parse_config([*TINY, "--lora_r", "3", "--peft", "roselora", "--eval_steps", "5",
                              "--target_modules", "q_proj|v_proj", "--bf16", "false"])
    write_run_config(config, tmp_path / "run_config.yaml")
    again, _ = parse_config(["--config", str(tmp_path / "run_config.yaml")])
    assert asdict(again) == asdict(config)
    assert "local_rank" not in (tmp_path / "run_config.yaml").read_text()  # each rank gets its own from the launcher


def test_the_examples_are_the_documented_ones():
    assert [p.name for p in EXAMPLES] == ["demo.yaml", "llama-70b-nf4-2node.yaml", "llama3-8b-bf16-8gpu.yaml"]


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_every_example_parses_from_anywhere(example, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the shipped DeepSpeed configs are named, not found by a relative path
    settings = read_config_file(str(example))
    # The examples name a cluster's model and data; local stand-ins let everything else be checked as given.
    stand_ins = {"model": str(EMBEDDED_MODEL), "dataset": str(write_dataset(tmp_path / "data.jsonl", 4))}
    overrides = [token for key in stand_ins if key in settings and not Path(str(settings[key])).exists()
                 and not str(settings[key]).startswith("pypi:") for token in (f"--{key}", stand_ins[key])]
    config, explicit = parse_config(["--config", str(example), *overrides])
    assert explicit == set(settings)
    for key, value in settings.items():
        if key == "ds_config":
            assert config.ds_config == str(SHIPPED_DS_CONFIG.parent / f"{value}.json")
        elif f"--{key}" not in overrides:
            assert getattr(config, key) == value, key


def test_a_shipped_deepspeed_config_by_name_and_hf_s_own_zero3_json(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert parse_config([*TINY, "--deepspeed", "z3_offload"])[0].ds_config == str(
        SHIPPED_DS_CONFIG.parent / "z3_offload.json")
    hf = {"optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto",
                                                     "weight_decay": "auto"}},
          "scheduler": {"type": "WarmupDecayLR", "params": {"warmup_min_lr": "auto", "warmup_max_lr": "auto",
                                                            "warmup_num_steps": "auto", "total_num_steps": "auto"}},
          "fp16": {"enabled": "auto"}, "bf16": {"enabled": "auto"}, "gradient_clipping": "auto",
          "train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
          "zero_optimization": {"stage": 3, "reduce_bucket_size": "auto", "stage3_prefetch_bucket_size": "auto",
                                "stage3_param_persistence_threshold": "auto"}}
    (tmp_path / "hf.json").write_text(json.dumps(hf))
    config, explicit = parse_config([*TINY, "--deepspeed", "hf.json", "--adam_beta2", "0.95", "--adam_epsilon", "1e-6"])
    ds = read_ds_config(config.ds_config)
    config, bf16 = reconcile(ds, config, explicit, False)
    filled = fill_auto(ds, config, world_size=2, hidden_size=64, total_steps=10, bf16=bf16)
    assert filled["optimizer"]["params"] == {"lr": 1e-3, "betas": [0.9, 0.95], "eps": 1e-6, "weight_decay": 0.0}
    assert filled["scheduler"]["params"] == {"warmup_min_lr": 0.0, "warmup_max_lr": 1e-3, "warmup_num_steps": 0,
                                             "total_num_steps": 10}


def test_a_relative_path_in_a_config_file_is_the_current_directory_s_with_a_hint(tmp_path, monkeypatch):
    (tmp_path / "runs").mkdir()
    write_dataset(tmp_path / "runs" / "data.jsonl", 4)
    (tmp_path / "runs" / "job.yaml").write_text(f"model: {EMBEDDED_MODEL}\ndataset: data.jsonl\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=f"dataset data.jsonl is read from the current directory \\({tmp_path}\\), "
                                          f"where it is not; it is beside the config file: give "
                                          f"{tmp_path / 'runs' / 'data.jsonl'}"):
        parse_config(["--config", "runs/job.yaml"])
    monkeypatch.chdir(tmp_path / "runs")
    assert parse_config(["--config", "job.yaml"])[0].dataset == "data.jsonl"


def test_a_saved_run_config_reruns_into_a_new_output_dir(tmp_path):
    config, _ = parse_config([*TINY, "--output_dir", str(tmp_path / "first"), "--resume"])
    write_run_config(config, tmp_path / "run_config.yaml")
    again, explicit = parse_config(["--config", str(tmp_path / "run_config.yaml"), "--output_dir",
                                    str(tmp_path / "second")])
    assert again.output_dir == str(tmp_path / "second") and again.resume == "latest"
    assert {**asdict(again), "output_dir": config.output_dir} == asdict(config)


def test_a_warm_up_ratio_run_config_reruns_with_its_ratio(tmp_path):
    from dataclasses import replace

    config, _ = parse_config([*TINY, "--warmup_ratio", "0.1"])
    write_run_config(replace(config, warmup_steps=9), tmp_path / "run_config.yaml")  # as the recipe resolves it
    again, _ = parse_config(["--config", str(tmp_path / "run_config.yaml")])
    assert (again.warmup_ratio, again.warmup_steps) == (0.1, 0)


@pytest.mark.parametrize("argv,field,value", [
    (["--bf16", "True"], "bf16", "true"),  # HF Trainer's examples
    (["--lora_target", "all", "--peft", "lora"], "target_modules", None),  # LLaMA-Factory's
    (["--target_modules", "all-linear"], "target_modules", None),  # PEFT's
    (["--resume_from_checkpoint", "False"], "resume", None),
    (["--resume_from_checkpoint=false"], "resume", None),
    (["--finetuning_type", "lora"], "peft", "lora"),
])
def test_their_spellings_of_our_values(argv, field, value):
    assert getattr(parse_config([*TINY, *argv])[0], field) == value


def test_resume_from_checkpoint_false_in_a_file_is_no_resume(tmp_path):
    (tmp_path / "hf.yaml").write_text("resume_from_checkpoint: false\n")
    assert parse_config([*TINY, "--config", str(tmp_path / "hf.yaml")])[0].resume is None
