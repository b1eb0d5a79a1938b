"""launch/merge.py streams the base checkpoint: sharded output that from_pretrained loads and that computes
what the adapter-loaded model computes, a peak memory of about a layer, and quantized bases dequantized."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

from speft_ds import load_adapter
from speft_ds.methods.adapter_files import base_config_hash
from speft_ds.methods.speft.adapter_format import save_adapter
from speft_ds.models.loading import find_targets
from tests.models import write_tiny_llama

REPO = Path(__file__).resolve().parents[1]


def _random_adapter(model_dir: Path, out: Path, density: float, targets: list[str] | None = None) -> Path:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    targets = targets or list(find_targets(model, None))
    generator = torch.Generator().manual_seed(1)
    indices, values, shapes = {}, {}, {}
    for name in targets:
        weight = model.get_submodule(name).weight
        k = max(1, int(density * weight.numel()))
        indices[name] = torch.randperm(weight.numel(), generator=generator)[:k].sort().values
        values[name] = torch.randn(k, generator=generator) * 0.1
        shapes[name] = list(weight.shape)
    save_adapter(out, indices, values, shapes, {"base_config_hash": base_config_hash(model.config)})
    return out


def _merge(model_dir: Path, adapter: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "launch/merge.py", "--model", str(model_dir), "--adapter", str(adapter),
                           "--out", str(out), *extra], cwd=REPO, capture_output=True, text=True, timeout=600)


def _digest(directory: Path) -> str:
    return hashlib.sha256(b"".join(p.read_bytes() for p in sorted(directory.glob("*.safetensors")))).hexdigest()


def test_sharded_merge_loads_with_from_pretrained_and_matches_the_adapter_loaded_model(tmp_path):
    base = write_tiny_llama(tmp_path / "base", max_shard_size="40KB")
    assert len(list(base.glob("*.safetensors"))) > 1
    targets = ["model.embed_tokens", "lm_head"] + list(find_targets(AutoModelForCausalLM.from_pretrained(base), None))
    adapter = _random_adapter(base, tmp_path / "adapter", 0.05, targets)
    before = _digest(base)

    proc = _merge(base, adapter, tmp_path / "merged", "--max_shard_size", "30KB")
    assert proc.returncode == 0, proc.stderr[-3000:]
    merged_dir = tmp_path / "merged"
    index = json.loads((merged_dir / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and shards == sorted(p.name for p in merged_dir.glob("*.safetensors"))
    for shard in shards:  # each at most 30 KB of tensors, but for a single larger tensor
        with safe_open(str(merged_dir / shard), framework="pt") as handle:
            sizes = [handle.get_tensor(k).nbytes for k in handle.keys()]
        assert sum(sizes) <= 30_000 or len(sizes) == 1
    assert _digest(base) == before  # the base is read, never written

    ids = torch.randint(0, 200, (2, 12), generator=torch.Generator().manual_seed(0))
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    loaded = load_adapter(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval(), adapter)
    plain = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    with torch.no_grad():
        want = loaded(ids).logits
        torch.testing.assert_close(merged(ids).logits, want, rtol=1e-5, atol=1e-5)
        assert (plain(ids).logits - want).abs().max() > 1e-2  # the deltas are really in there
    assert (merged_dir / "tokenizer.json").is_file() or (merged_dir / "tokenizer.model").is_file()


def test_merge_memory_is_about_one_layer_not_the_model(tmp_path):
    """A 16-layer, ~200 MB fp32 base merged with 8 MB output shards: the merge process's peak RSS rises by
    far less than the model's size (loading it whole would add all of it)."""
    config = LlamaConfig(vocab_size=512, hidden_size=512, intermediate_size=1376, num_hidden_layers=16,
                         num_attention_heads=8, num_key_value_heads=8, tie_word_embeddings=False)
    torch.manual_seed(0)
    base = tmp_path / "base"
    LlamaForCausalLM(config).save_pretrained(base, max_shard_size="64MB")
    model_bytes = sum(p.stat().st_size for p in base.glob("*.safetensors"))
    layer_bytes = 4 * (4 * 512 * 512 + 3 * 512 * 1376)
    adapter = _random_adapter(base, tmp_path / "adapter", 0.01)
    # VmHWM is this process's own peak (ru_maxrss carries the parent's across fork and exec); writing 5 to
    # clear_refs resets it to the current RSS once the imports are done.
    driver = (
        "import sys\n"
        "from speft_ds.commands.merging import merge_checkpoint\n"
        "from transformers import AutoConfig\n"
        "AutoConfig.from_pretrained(sys.argv[1])  # its first call imports ~100 MB of modules: not the merge's\n"
        "status = lambda key: int(next(l for l in open('/proc/self/status') if l.startswith(key)).split()[1])\n"
        "open('/proc/self/clear_refs', 'w').write('5')\n"
        "baseline_kib = status('VmRSS:')\n"
        "merge_checkpoint(sys.argv[1], sys.argv[2], sys.argv[3], 8 * 2**20)\n"
        "print(status('VmHWM:') - baseline_kib)\n")
    proc = subprocess.run([sys.executable, "-c", driver, str(base), str(adapter), str(tmp_path / "merged")],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    growth = int(proc.stdout.split()[-1]) * 1024
    print(f"model {model_bytes / 2**20:.0f} MiB, one layer {layer_bytes / 2**20:.1f} MiB, "
          f"peak RSS growth {growth / 2**20:.1f} MiB")
    assert growth < model_bytes / 4
    assert len(list((tmp_path / "merged").glob("*.safetensors"))) > 16


@pytest.mark.parametrize("quantization", ["nf4", "int8"])
def test_a_quantized_base_is_dequantized_merged_and_written_in_bf16(tmp_path, quantization):
    dense = write_tiny_llama(tmp_path / "dense", hidden_size=36, intermediate_size=48)
    bnb = (BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.float32)
           if quantization == "nf4" else BitsAndBytesConfig(load_in_8bit=True))
    quantized = AutoModelForCausalLM.from_pretrained(dense, quantization_config=bnb, device_map="cpu")
    quantized.save_pretrained(tmp_path / "base")
    (tmp_path / "base" / "tokenizer.json").write_bytes((dense / "tokenizer.json").read_bytes())
    adapter = _random_adapter(dense, tmp_path / "adapter", 0.05)

    proc = _merge(tmp_path / "base", adapter, tmp_path / "merged")
    assert proc.returncode == 0, proc.stderr[-3000:]
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert "quantization_config" not in config
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert merged.dtype == torch.bfloat16

    indices = {name.removesuffix(".indices"): t for name, t in
               _safetensors(adapter / "adapter_model.safetensors").items() if name.endswith(".indices")}
    values = _safetensors(adapter / "adapter_model.safetensors")
    # The independent reference: the quantized layer's own forward on the identity gives its weight.
    tolerance = 5e-3 if quantization == "nf4" else 2e-2  # bf16 rounding; int8 also quantizes its input
    for name, idx in indices.items():
        layer = quantized.get_submodule(name)
        # (An input that requires grad keeps bitsandbytes off its CPU inference repacking, which needs
        # out_features divisible by 32.)
        weight = layer(torch.eye(layer.in_features, requires_grad=True)).detach().float().t().contiguous()
        weight.view(-1)[idx] += values[f"{name}.values"]
        got = merged.get_submodule(name).weight.float()
        assert (got - weight).norm() / weight.norm() < tolerance, name
        assert (got.view(-1)[idx] - weight.view(-1)[idx]).norm() / weight.view(-1)[idx].norm() < tolerance


def _safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def test_an_adapter_of_another_base_or_a_pickle_only_base_is_refused_before_anything_is_written(tmp_path):
    base = write_tiny_llama(tmp_path / "base")
    other = write_tiny_llama(tmp_path / "other", num_layers=3)
    proc = _merge(base, _random_adapter(other, tmp_path / "adapter", 0.05), tmp_path / "merged")
    assert proc.returncode == 2 and proc.stderr.startswith("error: the adapter was trained on another base model")
    for model_file in base.glob("*.safetensors"):
        model_file.unlink()
    proc = _merge(base, _random_adapter(other, tmp_path / "adapter2", 0.05), tmp_path / "merged")
    assert proc.returncode == 2 and "has no safetensors weights" in proc.stderr
    assert not any(p.name.startswith((".merged", "merged")) for p in tmp_path.iterdir())
