"""Adapter files, load and merge, on a tiny LLaMA, against weights edited in plain torch."""

from __future__ import annotations

import copy
import json
from importlib.metadata import version

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from speft_ds.config import ConfigError
from speft_ds.methods.speft.adapter_format import load_adapter, merge_adapter, save_adapter
from speft_ds.methods.speft.delta import SparseDeltaLinear

TARGETS = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj", "model.layers.1.self_attn.v_proj"]


def tiny_llama(hidden_size: int = 32, num_layers: int = 2, seed: int = 0) -> LlamaForCausalLM:
    config = LlamaConfig(hidden_size=hidden_size, num_hidden_layers=num_layers, intermediate_size=64,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=64,
                         tie_word_embeddings=False, max_position_embeddings=64)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    model.requires_grad_(False)
    return model


def logits(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=input_ids).logits


@pytest.fixture(scope="module")
def base_model():
    return tiny_llama()


@pytest.fixture(scope="module")
def input_ids():
    return torch.randint(0, 64, (2, 11), generator=torch.Generator().manual_seed(7))


@pytest.fixture
def adapter(base_model, tmp_path):
    """A random adapter over TARGETS saved under tmp_path/adapter: (path, indices, values, shapes, meta)."""
    gen = torch.Generator().manual_seed(123)
    indices, values, shapes = {}, {}, {}
    for name in TARGETS:
        weight = base_model.get_submodule(name).weight
        k = int(torch.randint(1, weight.numel() // 4, (1,), generator=gen))
        indices[name] = torch.randperm(weight.numel(), generator=gen)[:k].sort().values
        values[name] = torch.randn(k, generator=gen)  # large next to the 0.02-std init: visible in logits
        shapes[name] = list(weight.shape)
    meta = {"base_model_name_or_path": "tiny", "metric": "gradient", "selection": "global"}
    path = tmp_path / "adapter"
    save_adapter(path, indices, values, shapes, meta)
    return path, indices, values, shapes, meta


def reference_model(base_model, indices, values) -> nn.Module:
    """The base model with each targeted weight edited in plain torch: W.view(-1)[idx] += values."""
    ref = copy.deepcopy(base_model)
    with torch.no_grad():
        for name, idx in indices.items():
            ref.get_submodule(name).weight.view(-1)[idx] += values[name]
    return ref


def test_save_adapter_files(adapter, tmp_path):
    """safetensors holds NAME.indices (int64) and NAME.values per module; the JSON holds shapes, k and
    versions plus the caller's metadata; nothing temporary is left beside the adapter."""
    path, indices, values, shapes, meta = adapter
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]
    assert sorted(p.name for p in path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]

    tensors = load_file(str(path / "adapter_model.safetensors"))
    assert set(tensors) == {f"{n}.{part}" for n in TARGETS for part in ("indices", "values")}
    for name in TARGETS:
        assert tensors[f"{name}.indices"].dtype == torch.int64
        assert torch.equal(tensors[f"{name}.indices"], indices[name])
        assert tensors[f"{name}.values"].dtype == torch.float32
        assert torch.equal(tensors[f"{name}.values"], values[name])

    config = json.loads((path / "adapter_config.json").read_text())
    assert config["shapes"] == shapes
    assert config["k"] == sum(t.numel() for t in indices.values())
    assert {"torch", "transformers", "deepspeed", "speft-ds"} <= set(config["versions"])
    assert config["versions"]["torch"] == version("torch")
    for key, value in meta.items():
        assert config[key] == value


def test_save_adapter_replaces_existing(adapter, base_model, tmp_path):
    """Saving again over an existing adapter replaces it whole and leaves no temporary directory."""
    path, indices, values, shapes, meta = adapter
    name = TARGETS[0]
    new_indices = {name: torch.tensor([0, 5, 9])}
    new_values = {name: torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64)}  # stored as float32
    save_adapter(path, new_indices, new_values, {name: shapes[name]}, meta)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]
    tensors = load_file(str(path / "adapter_model.safetensors"))
    assert set(tensors) == {f"{name}.indices", f"{name}.values"}
    assert tensors[f"{name}.values"].dtype == torch.float32
    assert torch.equal(tensors[f"{name}.values"], torch.tensor([1.0, -2.0, 3.0]))
    config = json.loads((path / "adapter_config.json").read_text())
    assert config["shapes"] == {name: shapes[name]} and config["k"] == 3


def test_load_adapter_matches_plain_torch_edit(adapter, base_model, input_ids):
    """load_adapter's unmerged model computes the logits of the weight-edited reference."""
    path, indices, values, _, _ = adapter
    ref = reference_model(base_model, indices, values)
    expected = logits(ref, input_ids)
    assert not torch.allclose(expected, logits(base_model, input_ids), atol=1e-3), "adapter has no visible effect"

    model = copy.deepcopy(base_model)
    assert load_adapter(model, path) is model
    for name in TARGETS:
        layer = model.get_submodule(name)
        assert isinstance(layer, SparseDeltaLinear)
        assert torch.equal(layer.delta_indices.long(), indices[name])
        assert layer.delta_indices.dtype == torch.int32 and not layer.delta_indices.requires_grad
        assert layer.delta_values.requires_grad
    torch.testing.assert_close(logits(model, input_ids), expected)
    # Modules outside the adapter are untouched.
    wrapped = [n for n, m in model.named_modules() if isinstance(m, SparseDeltaLinear)]
    assert sorted(wrapped) == sorted(TARGETS)


def test_merge_adapter_matches_plain_torch_edit(adapter, base_model, input_ids):
    """merge_adapter leaves plain nn.Linear layers whose weights equal the edited reference."""
    path, indices, values, _, _ = adapter
    ref = reference_model(base_model, indices, values)
    model = copy.deepcopy(base_model)
    assert merge_adapter(model, path) is model
    assert not any(isinstance(m, SparseDeltaLinear) for m in model.modules())
    for name in TARGETS:
        assert type(model.get_submodule(name)) is nn.Linear
    ref_state = ref.state_dict()
    state = model.state_dict()
    assert set(state) == set(ref_state)  # same parameter names: no wrapper left in the state dict
    for key in ref_state:
        torch.testing.assert_close(state[key], ref_state[key], msg=lambda m, key=key: f"{key}: {m}")
    torch.testing.assert_close(logits(model, input_ids), logits(ref, input_ids))


def test_mismatched_model_is_refused(adapter, input_ids):
    """A model of another hidden size, or lacking a targeted module, is refused before anything changes."""
    path = adapter[0]
    wider = tiny_llama(hidden_size=48)
    before = copy.deepcopy(wider.state_dict())
    for action in (load_adapter, merge_adapter):
        with pytest.raises(ConfigError):
            action(wider, path)
    assert not any(isinstance(m, SparseDeltaLinear) for m in wider.modules())
    for key, value in wider.state_dict().items():
        assert torch.equal(value, before[key])

    shallower = tiny_llama(num_layers=1)  # has no model.layers.1
    with pytest.raises(ConfigError):
        load_adapter(shallower, path)
    assert not any(isinstance(m, SparseDeltaLinear) for m in shallower.modules())


def test_directory_without_adapter_is_refused(base_model, tmp_path):
    """A directory lacking the adapter files (or missing one of them) is a ConfigError."""
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError):
        load_adapter(copy.deepcopy(base_model), empty)
    with pytest.raises(ConfigError):
        merge_adapter(copy.deepcopy(base_model), tmp_path / "missing")
    half = tmp_path / "half"
    half.mkdir()
    (half / "adapter_config.json").write_text(json.dumps({"shapes": {}}))
    with pytest.raises(ConfigError):
        load_adapter(copy.deepcopy(base_model), half)


def test_adapter_from_another_base_is_refused(base_model, tmp_path):
    """Same shapes, other architecture config (rms_norm_eps): refused through the base config hash."""
    from speft_ds.methods.adapter_files import base_config_hash

    name = TARGETS[0]
    path = tmp_path / "adapter"
    save_adapter(path, {name: torch.tensor([0, 5])}, {name: torch.ones(2)},
                 {name: list(base_model.get_submodule(name).weight.shape)},
                 {"base_config_hash": base_config_hash(base_model.config)})
    load_adapter(copy.deepcopy(base_model), path)  # the right base loads
    other = copy.deepcopy(base_model)
    other.config.rms_norm_eps = 1e-3
    with pytest.raises(ConfigError, match="another base model"):
        load_adapter(other, path)


@pytest.mark.parametrize("damage", ["truncated", "not_json", "unsorted", "out_of_range", "length"])
def test_corrupt_adapter_is_refused(adapter, base_model, damage):
    from safetensors.torch import save_file

    path, indices, values, shapes, _ = adapter
    name = TARGETS[0]
    weights = path / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    if damage == "truncated":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif damage == "not_json":
        (path / "adapter_config.json").write_text("{ half")
    else:
        if damage == "unsorted":
            tensors[f"{name}.indices"] = tensors[f"{name}.indices"].flip(0).contiguous()
        elif damage == "out_of_range":
            tensors[f"{name}.indices"][-1] = shapes[name][0] * shapes[name][1]
        else:
            tensors[f"{name}.values"] = tensors[f"{name}.values"][:-1].contiguous()
        save_file(tensors, str(weights))
    with pytest.raises(ConfigError, match="corrupt"):
        load_adapter(copy.deepcopy(base_model), path)
    with pytest.raises(ConfigError, match="corrupt"):
        merge_adapter(copy.deepcopy(base_model), path)


def test_adapter_written_module_by_module_is_byte_for_byte_safetensors_own(tmp_path):
    """AdapterWriter takes the modules one at a time, in any order, and writes what safetensors' save_file
    writes for all of them at once (names sorting 10 before 2, dtypes int64 before float32)."""
    from safetensors.torch import save_file

    from speft_ds.methods.speft.adapter_format import AdapterWriter

    g = torch.Generator().manual_seed(0)
    names = [f"model.layers.{i}.mlp.down_proj" for i in (2, 10, 0)] + ["model.layers.1.self_attn.q_proj"]
    indices = {n: torch.randperm(1000, generator=g)[:n_].sort().values for n, n_ in zip(names, (7, 1, 30, 12))}
    values = {n: torch.randn(idx.numel(), generator=g) for n, idx in indices.items()}
    writer = AdapterWriter(tmp_path / "adapter", {n: idx.numel() for n, idx in indices.items()},
                           {n: [10, 100] for n in names})
    for name in reversed(names):
        writer.add(name, indices[name], values[name])
    writer.finish({"metric": "gradient"})
    reference = tmp_path / "reference.safetensors"
    save_file({**{f"{n}.indices": indices[n] for n in names}, **{f"{n}.values": values[n] for n in names}},
              str(reference), metadata={"format": "pt"})
    assert (tmp_path / "adapter" / "adapter_model.safetensors").read_bytes() == reference.read_bytes()
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["k"] == 50


def test_an_adapter_closed_before_every_module_came_leaves_no_file(tmp_path):
    from speft_ds.methods.speft.adapter_format import AdapterWriter

    writer = AdapterWriter(tmp_path / "adapter", {"a": 2, "b": 3}, {"a": [1, 4], "b": [1, 4]})
    writer.add("a", torch.tensor([0, 1]), torch.ones(2))
    with pytest.raises(ValueError, match="without b"):
        writer.finish({})
    assert list(tmp_path.iterdir()) == []
