"""The command line, --target_modules patterns and DeepSpeed config reconciliation."""

from __future__ import annotations

import copy
import json
from dataclasses import fields

import pytest

from speft_ds.cli import parse_config
from speft_ds.config import SHIPPED_DS_CONFIG, ConfigError, TrainConfig, target_pattern
from speft_ds.runtime.ds_config import fill_auto, read_ds_config, reconcile, resolve_bf16


# --------------------------------------------------------------------------- CLI

def test_defaults_parse():
    """No flags: the dataclass defaults, and nothing reported as explicit."""
    config, explicit = parse_config([])
    assert config == TrainConfig()
    assert explicit == set()


@pytest.mark.parametrize("peft, expected", [("speft", 1e-3), ("roselora", 1e-3), ("lora", 3e-3)])
def test_learning_rate_defaults_per_method(peft, expected):
    """Each method's rate where none is given (docs/quality_v2.md); a given rate wins for every method."""
    assert parse_config(["--peft", peft])[0].learning_rate == expected
    assert parse_config(["--peft", peft, "--learning_rate", "2e-4"])[0].learning_rate == 2e-4


def test_explicit_flags_are_typed_and_reported():
    config, explicit = parse_config(["--density", "0.05", "--selection", "global", "--num_trainable", "12",
                                     "--micro_batch_size", "3", "--target_modules", "q_proj,v_proj",
                                     "--bf16", "false", "--learning_rate", "1e-4"])
    assert explicit == {"density", "selection", "num_trainable", "micro_batch_size", "target_modules", "bf16",
                        "learning_rate"}
    assert config.density == 0.05 and isinstance(config.density, float)
    assert config.num_trainable == 12 and isinstance(config.num_trainable, int)
    assert config.micro_batch_size == 3 and config.selection == "global" and config.bf16 == "false"
    assert config.learning_rate == 1e-4 and config.target_modules == "q_proj,v_proj"
    # Flags not given keep their defaults.
    defaults = TrainConfig()
    for f in fields(TrainConfig):
        if f.name not in explicit:
            assert getattr(config, f.name) == getattr(defaults, f.name), f.name


@pytest.mark.parametrize("argv,expected", [
    (["--overwrite_output_dir"], True),
    (["--overwrite_output_dir", "true"], True),
    (["--overwrite_output_dir", "yes"], True),
    (["--overwrite_output_dir", "false"], False),
    (["--overwrite_output_dir", "0"], False),
    (["--overwrite_output_dir", "--density", "0.5"], True),  # a bare bool before another flag
])
def test_bool_flags(argv, expected):
    config, explicit = parse_config(argv)
    assert config.overwrite_output_dir is expected
    assert "overwrite_output_dir" in explicit


@pytest.mark.parametrize("argv", [
    ["--density", "0"],
    ["--density", "1.5"],
    ["--density", "-0.1"],
    ["--density", "abc"],
    ["--num_trainable", "0"],
    ["--num_trainable", "1.5"],
    ["--metric", "nope"],
    ["--selection", "nope"],
    ["--lr_scheduler", "nope"],
    ["--bf16", "maybe"],
    ["--overwrite_output_dir", "perhaps"],
    ["--micro_batch_size", "0"],
    ["--val_size", "1"],
    ["--max_steps", "0"],
    ["--target_modules", "(unclosed"],
    ["--model", "/nonexistent/model"],
    ["--ds_config", "/nonexistent/ds.json"],
    ["--dataset", "/nonexistent/data.jsonl"],
    ["--no_such_flag", "1"],
    ["stray_positional"],
])
def test_bad_values_raise_config_error(argv):
    with pytest.raises(ConfigError):
        parse_config(argv)


# --------------------------------------------------------------------------- --target_modules

def test_plain_names_match_last_component():
    pattern = target_pattern("q_proj,v_proj")
    assert pattern.fullmatch("model.layers.0.self_attn.q_proj")
    assert pattern.fullmatch("model.layers.3.self_attn.v_proj")
    assert pattern.fullmatch("q_proj")
    assert not pattern.fullmatch("model.layers.0.self_attn.k_proj")
    assert not pattern.fullmatch("model.layers.0.self_attn.q_proj_extra")
    assert not pattern.fullmatch("model.layers.0.self_attn.xq_proj")
    # Whitespace around names is ignored.
    assert target_pattern(" q_proj , v_proj ").fullmatch("model.layers.0.self_attn.v_proj")


def test_regex_is_matched_against_full_name():
    pattern = target_pattern(r".*\.layers\.1\..*_proj")
    assert pattern.fullmatch("model.layers.1.self_attn.q_proj")
    assert pattern.fullmatch("model.layers.1.mlp.down_proj")
    assert not pattern.fullmatch("model.layers.0.mlp.down_proj")
    assert not pattern.fullmatch("model.layers.11.mlp.down_proj")
    assert not pattern.fullmatch("model.layers.1.mlp.down_proj_extra")
    assert not pattern.fullmatch("model.layers.1.mlp")


@pytest.mark.parametrize("spec", ["(", "[a-", "*q_proj", "q_proj)"])
def test_invalid_regex_raises(spec):
    with pytest.raises(ConfigError):
        target_pattern(spec)


@pytest.mark.parametrize("spec", ["", ",", " , "])
def test_empty_name_list_raises(spec):
    with pytest.raises(ConfigError):
        target_pattern(spec)


# --------------------------------------------------------------------------- DeepSpeed config

def write_json(path, obj) -> str:
    path.write_text(json.dumps(obj))
    return str(path)


def walk_values(node):
    """Every leaf value of a JSON-like tree, lists included."""
    if isinstance(node, dict):
        for value in node.values():
            yield from walk_values(value)
    elif isinstance(node, list):
        for value in node:
            yield from walk_values(value)
    else:
        yield node


def test_read_shipped_config():
    ds = read_ds_config(str(SHIPPED_DS_CONFIG))
    assert ds["zero_optimization"]["stage"] == 3
    assert ds == json.loads(SHIPPED_DS_CONFIG.read_text())


def test_non_stage3_and_unreadable_configs_raise(tmp_path):
    shipped = json.loads(SHIPPED_DS_CONFIG.read_text())
    stage2 = copy.deepcopy(shipped)
    stage2["zero_optimization"]["stage"] = 2
    no_zero = {k: v for k, v in shipped.items() if k != "zero_optimization"}
    broken = tmp_path / "broken.json"
    broken.write_text('{"zero_optimization": {"stage": 3},')
    for path in (write_json(tmp_path / "stage2.json", stage2), write_json(tmp_path / "nozero.json", no_zero),
                 str(broken), str(tmp_path / "missing.json")):
        with pytest.raises(ConfigError):
            read_ds_config(path)


def training_config(**overrides) -> TrainConfig:
    values = dict(micro_batch_size=4, gradient_accumulation_steps=3, learning_rate=1e-3, weight_decay=0.1,
                  max_grad_norm=0.5, warmup_steps=7)
    values.update(overrides)
    return TrainConfig(**values)


def shipped_with_scheduler() -> dict:
    ds = json.loads(SHIPPED_DS_CONFIG.read_text())
    ds["scheduler"] = {"type": "WarmupDecayLR", "params": {"warmup_min_lr": "auto", "warmup_max_lr": "auto",
                                                           "warmup_num_steps": "auto", "total_num_steps": "auto"}}
    return ds


@pytest.mark.parametrize("with_scheduler", [False, True])
@pytest.mark.parametrize("bf16", [False, True])
def test_reconcile_and_fill_auto_fill_every_auto(with_scheduler, bf16):
    """Every "auto" is replaced by the flag it mirrors, and the batch size is the product of its parts."""
    ds = shipped_with_scheduler() if with_scheduler else read_ds_config(str(SHIPPED_DS_CONFIG))
    original = copy.deepcopy(ds)
    config = training_config()
    reconciled, bf16_out = reconcile(ds, config, explicit=set(), bf16=bf16)
    assert reconciled == config and bf16_out is bf16  # nothing concrete to apply
    filled = fill_auto(ds, reconciled, world_size=2, hidden_size=64, total_steps=100, bf16=bf16_out)

    assert "auto" not in list(walk_values(filled))
    assert ds == original, "fill_auto must not modify its input"
    assert filled["train_batch_size"] == 4 * 3 * 2
    assert filled["train_micro_batch_size_per_gpu"] == 4
    assert filled["gradient_accumulation_steps"] == 3
    assert filled["gradient_clipping"] == 0.5
    assert filled["optimizer"]["params"]["lr"] == config.learning_rate
    assert filled["optimizer"]["params"]["weight_decay"] == 0.1
    assert filled["optimizer"]["params"]["betas"] == [0.9, 0.999]  # concrete values are kept
    assert filled["bf16"]["enabled"] is bf16
    zero = filled["zero_optimization"]
    assert zero["stage"] == 3
    for key in ("reduce_bucket_size", "stage3_prefetch_bucket_size"):
        assert isinstance(zero[key], int) and zero[key] > 0
    assert zero["stage3_param_persistence_threshold"] == 0  # so the small delta values are partitioned too
    if with_scheduler:
        params = filled["scheduler"]["params"]
        assert params["warmup_max_lr"] == config.learning_rate
        assert params["warmup_num_steps"] == 7
        assert params["total_num_steps"] == 100
        assert params["warmup_min_lr"] == 0.0


@pytest.mark.parametrize("path,field,ds_value,flag_value", [
    (("train_micro_batch_size_per_gpu",), "micro_batch_size", 2, 4),
    (("gradient_accumulation_steps",), "gradient_accumulation_steps", 5, 3),
    (("gradient_clipping",), "max_grad_norm", 2.0, 0.5),
    (("optimizer", "params", "lr"), "learning_rate", 5e-4, 1e-3),
    (("optimizer", "params", "weight_decay"), "weight_decay", 0.0, 0.1),
])
def test_concrete_value_conflicts_only_with_explicit_flag(path, field, ds_value, flag_value):
    """A concrete ds_config value that disagrees with an explicit flag is an error; without the flag it wins."""
    ds = read_ds_config(str(SHIPPED_DS_CONFIG))
    node = ds
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = ds_value
    config = training_config(**{field: flag_value})

    with pytest.raises(ConfigError):
        reconcile(ds, config, explicit={field}, bf16=False)

    reconciled, _ = reconcile(ds, config, explicit=set(), bf16=False)
    assert getattr(reconciled, field) == ds_value
    assert getattr(config, field) == flag_value  # the input config is left as it was
    filled = fill_auto(ds, reconciled, world_size=3, hidden_size=64, total_steps=10, bf16=False)
    assert "auto" not in list(walk_values(filled))
    assert filled["train_batch_size"] == (reconciled.micro_batch_size * reconciled.gradient_accumulation_steps
                                          * 3)

    # An explicit flag that agrees with the concrete value is fine.
    agreeing = training_config(**{field: ds_value})
    assert getattr(reconcile(ds, agreeing, explicit={field}, bf16=False)[0], field) == ds_value


def test_explicit_flag_conflict_through_the_cli(tmp_path):
    """End to end: --micro_batch_size 4 against a ds_config that says 2."""
    ds = json.loads(SHIPPED_DS_CONFIG.read_text())
    ds["train_micro_batch_size_per_gpu"] = 2
    path = write_json(tmp_path / "ds.json", ds)
    config, explicit = parse_config(["--ds_config", path, "--micro_batch_size", "4"])
    with pytest.raises(ConfigError):
        reconcile(read_ds_config(config.ds_config), config, explicit, bf16=False)
    config, explicit = parse_config(["--ds_config", path])
    assert reconcile(read_ds_config(config.ds_config), config, explicit, bf16=False)[0].micro_batch_size == 2


def test_bf16_conflict():
    ds = read_ds_config(str(SHIPPED_DS_CONFIG))
    ds["bf16"]["enabled"] = True
    with pytest.raises(ConfigError):
        reconcile(ds, training_config(bf16="false"), explicit={"bf16"}, bf16=False)
    _, bf16 = reconcile(ds, training_config(), explicit=set(), bf16=False)
    assert bf16 is True


def test_fill_auto_rejects_inconsistent_batch_and_unknown_auto():
    ds = read_ds_config(str(SHIPPED_DS_CONFIG))
    ds["train_batch_size"] = 999
    with pytest.raises(ConfigError):
        fill_auto(ds, training_config(), world_size=1, hidden_size=64, total_steps=10, bf16=False)
    ds = read_ds_config(str(SHIPPED_DS_CONFIG))
    ds["zero_optimization"]["sub_group_size"] = "auto"  # nothing mirrors it
    with pytest.raises(ConfigError):
        fill_auto(ds, training_config(), world_size=1, hidden_size=64, total_steps=10, bf16=False)


def test_resolve_bf16():
    assert resolve_bf16(TrainConfig(bf16="auto"), "cpu", True) is False
    assert resolve_bf16(TrainConfig(bf16="auto"), "cuda", True) is True
    assert resolve_bf16(TrainConfig(bf16="auto"), "cuda", False) is False
    assert resolve_bf16(TrainConfig(bf16="true"), "cpu", False) is True
    assert resolve_bf16(TrainConfig(bf16="false"), "cuda", True) is False


def test_fp16_against_a_concrete_bf16_or_fp16_in_the_ds_config():
    ds = read_ds_config(str(SHIPPED_DS_CONFIG))
    ds["bf16"]["enabled"] = True
    with pytest.raises(ConfigError, match="one precision at a time"):
        reconcile(ds, training_config(fp16=True), explicit={"fp16"}, bf16=True)
    ds = read_ds_config(str(SHIPPED_DS_CONFIG))
    ds["fp16"] = {"enabled": False}
    with pytest.raises(ConfigError, match="one precision at a time"):
        reconcile(ds, training_config(fp16=True), explicit={"fp16"}, bf16=False)
    ds["fp16"] = {"enabled": True}
    with pytest.raises(ConfigError, match="one precision at a time"):  # --bf16 true said otherwise
        reconcile(ds, training_config(bf16="true"), explicit={"bf16"}, bf16=True)
    # the JSON's own fp16, bf16 left to auto: fp16 alone
    config, bf16 = reconcile(ds, training_config(), explicit=set(), bf16=True)
    assert config.fp16 is True and bf16 is False


def test_adam_flags_fill_the_shipped_configs_and_concrete_betas_are_the_run_s():
    config, explicit = parse_config(["--adam_beta2", "0.95", "--adam_epsilon", "1e-6"])
    for name in ("z3", "z3_offload", "z3_cluster"):
        config.ds_config = name
        config.__post_init__()
        ds = read_ds_config(config.ds_config)
        reconciled, bf16 = reconcile(ds, config, explicit, bf16=False)
        filled = fill_auto(ds, reconciled, world_size=1, hidden_size=64, total_steps=10, bf16=bf16)
        assert filled["optimizer"]["params"]["betas"] == [0.9, 0.95] and filled["optimizer"]["params"]["eps"] == 1e-6
    ds = read_ds_config(str(SHIPPED_DS_CONFIG))
    ds["optimizer"]["params"]["betas"] = [0.8, 0.98]
    assert (reconcile(ds, training_config(), explicit=set(), bf16=False)[0].adam_beta2) == 0.98
