"""--config FILE: its keys are train.py's flags, the command line overrides it, bad keys and values are one
ConfigError; the resolved configuration written as run_config.yaml reruns to the same configuration."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import pytest

from speft_ds.cli import parse_config, read_config_file, write_run_config
from speft_ds.config import EMBEDDED_MODEL, ConfigError
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
    ("target_modules: [q_proj, v_proj]\n", "target_modules must be a single value"),
    ("- density\n", "must map flag names to values"),
    ("density: [0.01\n", "is not valid YAML or JSON"),
])
def test_a_bad_file_is_one_error_naming_the_problem(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        parse_config(["--config", str(path), *TINY])
    assert message in str(err.value) and "\n" not in str(err.value)


def test_a_missing_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        parse_config(["--config", str(tmp_path / "nope.yaml")])


def test_run_config_reruns_to_the_same_configuration(tmp_path):
    config, _ = parse_config([*TINY, "--density", "0.03", "--peft", "roselora", "--eval_steps", "5",
                              "--target_modules", "q_proj|v_proj", "--bf16", "false"])
    write_run_config(config, tmp_path / "run_config.yaml")
    again, _ = parse_config(["--config", str(tmp_path / "run_config.yaml")])
    assert asdict(again) == asdict(config)
    assert "local_rank" not in (tmp_path / "run_config.yaml").read_text()  # each rank gets its own from the launcher


def test_the_examples_are_the_documented_ones():
    assert [p.name for p in EXAMPLES] == ["demo.yaml", "llama-70b-nf4-2node.yaml", "llama3-8b-bf16-8gpu.yaml"]


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_every_example_parses(example, tmp_path):
    settings = read_config_file(str(example))
    # The examples name a cluster's model and data; local stand-ins let everything else be checked as given.
    stand_ins = {"model": str(EMBEDDED_MODEL), "dataset": str(write_dataset(tmp_path / "data.jsonl", 4))}
    overrides = [token for key in stand_ins if key in settings and not Path(str(settings[key])).exists()
                 and not str(settings[key]).startswith("pypi:") for token in (f"--{key}", stand_ins[key])]
    config, explicit = parse_config(["--config", str(example), *overrides])
    assert explicit == set(settings)
    for key, value in settings.items():
        if f"--{key}" not in overrides:
            assert getattr(config, key) == value, key
