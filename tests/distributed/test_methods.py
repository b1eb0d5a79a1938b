"""--peft lora and --peft roselora on 2 real ZeRO-3 ranks (gloo): what the optimizer holds, RoseLoRA's
pruning step against a plain single-process reference, its row/column budget and the bound on B A, and
adapters that the real `peft` package loads unchanged and the adapter tools apply."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from speft_ds.config import SHIPPED_DS_CONFIG
from tests.distributed.harness import run_ranks
from tests.models import tiny_job

REPO = Path(__file__).resolve().parents[2]
WORLD, STEPS, RANK, SPARSITY, BETA = 2, 8, 4, 0.75, 0.8
START, END = 0.25, 0.75  # dense for steps 1-2, the cubic schedule over steps 3-5, the final sparsity from step 6
RECORDED_STEP = 4  # a step inside the schedule


def _worker(rank, world_size, argv, probe_ids):
    from deepspeed.utils import safe_get_full_grad

    from speft_ds.cli import parse_config
    from speft_ds.recipe import plan_run, run
    from speft_ds.runtime import zero3

    config, explicit = parse_config(argv)
    plan = plan_run(config, explicit)
    method, recorded = plan.method, {}

    def whole(params):  # each factor's whole fp32 value (a collective)
        return {name: zero3.gather_full_fp32(p).view(zero3.full_shape(p)) for name, p in params.items()}

    if config.peft == "roselora":  # watch one step through the method's own hooks (every rank gathers alike)
        after_backward, after_step = method.after_backward, method.after_step

        def watched_after_backward(engine, step):
            if step == RECORDED_STEP:
                named = method._named_params()
                recorded.update(scores_before=method.whole_scores(), values=whole(named),
                                grads={n: safe_get_full_grad(p).detach().cpu().view(zero3.full_shape(p))
                                       for n, p in named.items()})
            after_backward(engine, step)

        def watched_after_step(engine, step):
            if step == RECORDED_STEP:
                recorded.update(scores=method.whole_scores(), stepped=whole(method._named_params()))
            after_step(engine, step)
            if step == RECORDED_STEP:
                recorded.update(pruned=whole(method._named_params()), keep=method.keep(step))

        method.after_backward, method.after_step = watched_after_backward, watched_after_step
    result = run(plan)
    engine, optimizer = result.engine, result.engine.optimizer
    params = dict(engine.module.named_parameters())
    engine.eval()
    with torch.no_grad():
        logits = engine(input_ids=probe_ids).logits
    out = {"trainable": {n: p.ds_numel for n, p in params.items() if p.requires_grad},
           "fp32_partition_numel": sum(t.numel() for t in optimizer.fp32_partitioned_groups_flat),
           "logits": logits, **recorded}
    zero3.destroy_engine(engine)
    return out


_RUNS: dict[str, dict] = {}


def _trained(method: str, tmp_path_factory) -> dict:
    """One 2-rank run per method, shared by the tests of this module."""
    if method not in _RUNS:
        _RUNS[method] = _train(method, tmp_path_factory)
    return _RUNS[method]


@pytest.fixture(scope="module", params=["lora", "roselora"])
def trained(request, tmp_path_factory):
    return _trained(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def roselora(tmp_path_factory):
    return _trained("roselora", tmp_path_factory)


def _train(method: str, tmp_path_factory) -> dict:
    root, model_dir, dataset = tiny_job(tmp_path_factory.mktemp(method), 48)
    ds_config = json.loads(SHIPPED_DS_CONFIG.read_text())
    # RoseLoRA with every factor kept whole by ZeRO-3 ("persistent"), whose pruning must reach that copy too;
    # tests/test_resume.py trains it partitioned.
    ds_config["zero_optimization"]["stage3_param_persistence_threshold"] = 10**6 if method == "roselora" else 0
    (root / "z3.json").write_text(json.dumps(ds_config))
    argv = ["--peft", method, "--ds_config", str(root / "z3.json"), "--model", str(model_dir), "--dataset", str(dataset),
            "--output_dir", str(root / "out"), "--max_steps", str(STEPS), "--micro_batch_size", "2",
            "--gradient_accumulation_steps", "2", "--learning_rate", "2e-2", "--seq_len", "48", "--val_size", "0.1",
            "--lora_r", str(RANK), "--eval_task", "none"]
    if method == "roselora":  # its schedule's flags, which plain LoRA has no use for
        argv += ["--rose_sparsity", str(SPARSITY), "--rose_start", str(START), "--rose_end", str(END),
                 "--rose_beta", str(BETA)]
    probe_ids = torch.tensor([[1, 20, 31, 42, 53, 64, 75, 86]])
    results = run_ranks(_worker, WORLD, argv, probe_ids, out_dir=root / "ranks")
    return {"method": method, "root": root, "model": model_dir, "results": results, "probe": probe_ids,
            "adapter": root / "out" / "adapter"}


def _targets(model_dir: Path) -> dict[str, torch.nn.Linear]:
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    return {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n}


def test_the_optimizer_holds_the_factors_alone_split_over_ranks(trained):
    targets = _targets(trained["model"])
    expected = RANK * sum(m.in_features + m.out_features for m in targets.values())
    for result in trained["results"]:
        assert all(".lora_A." in n or ".lora_B." in n for n in result["trainable"])
        assert sum(result["trainable"].values()) == expected
        assert expected / WORLD <= result["fp32_partition_numel"] <= expected / WORLD + 2 * len(targets) * WORLD


def test_the_adapter_is_peft_format_and_peft_loads_it_unchanged(trained):
    adapter = trained["adapter"]
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == RANK
    assert set(config) <= {f.name for f in fields(LoraConfig)} | {"peft_type", "peft_version", "auto_mapping"}
    assert config["base_model_name_or_path"] == str(trained["model"])
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    assert set(tensors) == {f"base_model.model.{n}.lora_{f}.weight" for n in _targets(trained["model"]) for f in "AB"}

    base = AutoModelForCausalLM.from_pretrained(trained["model"], dtype=torch.float32).eval()
    with torch.no_grad():
        base_logits = base(trained["probe"]).logits
        loaded = PeftModel.from_pretrained(base, str(adapter)).eval()
        torch.testing.assert_close(loaded(trained["probe"]).logits, trained["results"][0]["logits"],
                                   rtol=1e-5, atol=1e-5)
    assert (base_logits - trained["results"][0]["logits"]).abs().max() > 1e-3, "the adapter changes nothing"
    torch.testing.assert_close(trained["results"][1]["logits"], trained["results"][0]["logits"])


def test_merge_and_generate_apply_the_lora_adapter_and_inspect_declines_it(trained):
    out = trained["root"] / "merged"
    proc = subprocess.run([sys.executable, "launch/merge.py", "--model", str(trained["model"]),
                           "--adapter", str(trained["adapter"]), "--out", str(out), "--dtype", "float32"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(trained["probe"]).logits, trained["results"][0]["logits"],
                                   rtol=1e-5, atol=1e-5)
    gen = subprocess.run([sys.executable, "launch/generate.py", "--model", str(trained["model"]), "--adapter",
                          str(trained["adapter"]), "--prompt", "Question: 2 + 3?\nAnswer:", "--max_new_tokens", "4"],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert gen.returncode == 0, gen.stderr[-2000:]
    inspect = subprocess.run([sys.executable, "launch/mask.py", str(trained["adapter"])], cwd=REPO,
                             capture_output=True, text=True, timeout=300)
    assert inspect.returncode == 2 and "holds a LoRA adapter" in inspect.stderr


def _reference_masks(score: torch.Tensor, keep: float, dim: int) -> torch.Tensor:
    """Python loops: each line along `dim` zeroes its floor((1 - keep) x length) lowest scores (ties: the
    earlier position goes first)."""
    lines = score if dim == 1 else score.T
    mask = torch.ones_like(lines, dtype=torch.bool)
    for i, line in enumerate(lines.tolist()):
        order = sorted(range(len(line)), key=lambda j: (line[j], j))
        for j in order[:int((1 - keep) * len(line))]:
            mask[i, j] = False
    return mask if dim == 1 else mask.T


def test_one_pruning_step_equals_a_single_process_reference(roselora):
    trained = roselora
    for result in trained["results"]:  # every rank recorded the same whole tensors
        for key in ("scores", "pruned"):
            for name, value in result[key].items():
                assert torch.equal(value, trained["results"][0][key][name])
    r = trained["results"][0]
    assert 1 - SPARSITY < r["keep"] < 1
    for name, grad in r["grads"].items():
        want = BETA * r["scores_before"][name] + (1 - BETA) * (r["values"][name] * grad).abs()
        torch.testing.assert_close(r["scores"][name], want, rtol=1e-6, atol=0)
        mask = _reference_masks(r["scores"][name], r["keep"], dim=1 if name.endswith(".A") else 0)
        assert torch.equal(r["pruned"][name], r["stepped"][name] * mask)
        assert (r["stepped"][name][~mask] != 0).any(), "the step left nothing to prune"


def test_after_the_schedule_every_row_and_column_holds_its_budget(roselora):
    trained = roselora
    tensors = load_file(str(trained["adapter"] / "adapter_model.safetensors"))
    targets = _targets(trained["model"])
    nonzeros = 0
    for name, module in targets.items():
        a, b = tensors[f"base_model.model.{name}.lora_A.weight"], tensors[f"base_model.model.{name}.lora_B.weight"]
        kept_a = module.in_features - int(SPARSITY * module.in_features)
        kept_b = module.out_features - int(SPARSITY * module.out_features)
        assert ((a != 0).sum(dim=1) <= kept_a).all() and ((b != 0).sum(dim=0) <= kept_b).all()
        assert int(((b @ a) != 0).sum()) <= RANK * kept_a * kept_b
        nonzeros += int((a != 0).sum() + (b != 0).sum())
    side = json.loads((trained["adapter"] / "speft_ds_adapter.json").read_text())
    assert side["nonzeros"] == nonzeros <= side["final_budget"] < side["trainable"]
