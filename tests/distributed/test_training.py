"""The full recipe on 2 real ZeRO-3 ranks (gloo): what the optimizer holds, the training step against a
dense single-process reference, and the adapter written under ZeRO-3."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path

import matplotlib.pyplot
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from speft_ds import load_adapter, merge_adapter
from speft_ds.config import SHIPPED_DS_CONFIG, TrainConfig
from speft_ds.data.batches import tokenize_dataset
from speft_ds.data.sources import load_raw_dataset
from speft_ds.methods.speft.delta import SparseDeltaEmbedding, SparseDeltaLinear
from speft_ds.models.loading import load_tokenizer
from speft_ds.runtime.zero3 import destroy_engine
from tests.distributed.harness import run_ranks
from tests.models import write_dataset, write_tiny_llama
from tests.references import mean_token_loss, plain_micro_batches, plain_permutation, plain_split

REPO = Path(__file__).resolve().parents[2]
WORLD = 2
STEPS, MICRO_BATCH, GRAD_ACC, LR, MAX_NORM = 4, 2, 2, 1e-2, 1.0


def _worker(rank, world_size, argv, probe_ids):
    from deepspeed.utils import safe_get_full_grad

    from speft_ds.cli import parse_config
    from speft_ds.recipe import plan_run, run

    config, explicit = parse_config(argv)
    started = time.perf_counter()
    result = run(plan_run(config, explicit))
    run_wall_s = time.perf_counter() - started
    engine, optimizer = result.engine, result.engine.optimizer
    params = dict(engine.module.named_parameters())
    trained = {id(p) for group in optimizer.fp16_groups for p in group}
    engine.eval()
    with torch.no_grad():
        logits = engine(input_ids=probe_ids).logits
    result = {
        "trainable": {n: p.ds_numel for n, p in params.items() if p.requires_grad},
        "optimizer_params": {n: p.ds_numel for n, p in params.items() if id(p) in trained},
        "base_with_grad": [n for n, p in params.items() if not p.requires_grad and safe_get_full_grad(p) is not None],
        "fp32_partition_numel": sum(t.numel() for t in optimizer.fp32_partitioned_groups_flat),
        "optimizer_state_numel": sum(v.numel() for state in optimizer.optimizer.state.values()
                                     for v in state.values() if torch.is_tensor(v) and v.dim() > 0),
        "logits": logits,
        "run_wall_s": run_wall_s,
        "delta_impls": sorted({m.impl for m in engine.module.modules() if isinstance(m, SparseDeltaLinear)}),
        "index_shards": {n.removesuffix(".delta_indices"): (str(p.dtype), p.ds_tensor.numel(), p.ds_numel)
                         for n, p in params.items() if n.endswith(".delta_indices")},
    }
    destroy_engine(engine)
    return result


# The default run; named targets beyond the decoder linears; the dense delta product (the default on GPUs);
# a mask split per weight, half random, the rest by the task gradient over a general text's Fisher; deltas
# trained as a per-input-channel scale times the parameter.
MIXED_K = 600
VARIANTS = {"decoder-linears": [], "edge-targets": ["--target_modules", "embed_tokens,lm_head,q_proj"],
            "dense-delta": ["--delta_impl", "dense"],
            "mixed-mask": ["--selection", "local", "--num_trainable", str(MIXED_K), "--random_fraction", "0.5",
                           "--metric", "gradient_over_fisher", "--fisher_text", "{root}/general.txt"],
            "channel-scaled": ["--delta_scaling", "input_channel"]}


@pytest.fixture(scope="module", params=list(VARIANTS))
def trained(request, tmp_path_factory):
    root = tmp_path_factory.mktemp("training")
    model_dir = write_tiny_llama(root / "llama", max_shard_size="40KB")
    assert (model_dir / "model.safetensors.index.json").is_file()
    dataset = root / "data.jsonl"
    write_dataset(dataset, 48)
    ds_config = json.loads(SHIPPED_DS_CONFIG.read_text())
    ds_config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    # Limits small enough that ZeRO-3 prefetches and releases parameters as it would on a large model
    # (otherwise this whole model stays gathered): gathers outside a forward must cope with prefetches.
    ds_config["zero_optimization"].update(stage3_prefetch_bucket_size=20_000, stage3_max_live_parameters=20_000,
                                          stage3_max_reuse_distance=20_000)
    (root / "z3.json").write_text(json.dumps(ds_config))
    argv = ["--model", str(model_dir), "--dataset", str(dataset), "--ds_config", str(root / "z3.json"),
            "--output_dir", str(root / "out"), "--max_steps", str(STEPS), "--micro_batch_size", str(MICRO_BATCH),
            "--gradient_accumulation_steps", str(GRAD_ACC), "--learning_rate", str(LR), "--lr_scheduler", "constant",
            "--max_grad_norm", str(MAX_NORM), "--calibration_examples", "16", "--density", "0.05",
            "--seq_len", "48", "--logging_steps", "1", "--val_size", "0.1"]
    (root / "general.txt").write_text("The quick brown fox jumps over the lazy dog. " * 20)
    argv += [arg.format(root=root) for arg in VARIANTS[request.param]]
    probe_ids = torch.tensor([[1, 20, 31, 42, 53, 64, 75, 86]])
    results = run_ranks(_worker, WORLD, argv, probe_ids, out_dir=root / "ranks")
    config = TrainConfig(model=str(model_dir), dataset=str(dataset), seq_len=48, val_size=0.1)
    return {"variant": request.param, "root": root, "results": results, "config": config, "probe_ids": probe_ids,
            "adapter": root / "out" / "adapter", "metrics": root / "out" / "metrics.jsonl"}


def _adapter_tensors(adapter_dir: Path):
    tensors = load_file(str(adapter_dir / "adapter_model.safetensors"))
    names = json.loads((adapter_dir / "adapter_config.json").read_text())["shapes"]
    return {n: tensors[f"{n}.indices"] for n in names}, {n: tensors[f"{n}.values"] for n in names}


def test_optimizer_holds_exactly_k_values_split_over_ranks(trained):
    k = json.loads((trained["adapter"] / "adapter_config.json").read_text())["k"]
    indices, _ = _adapter_tensors(trained["adapter"])
    assert k == sum(t.numel() for t in indices.values()) > 0
    for r in trained["results"]:
        assert all(n.endswith("delta_values") for n in r["trainable"])
        assert sum(r["trainable"].values()) == k
        assert r["optimizer_params"] == r["trainable"]
        assert r["base_with_grad"] == []
        # ZeRO-3 pads each parameter to a multiple of the world size: at most one element per rank each.
        assert k / WORLD <= r["fp32_partition_numel"] <= math.ceil(k / WORLD) + len(r["trainable"])
        assert r["optimizer_state_numel"] == 2 * r["fp32_partition_numel"]  # AdamW: exp_avg + exp_avg_sq


def test_each_rank_keeps_only_its_share_of_the_indices(trained):
    """Indices are partitioned like the values and stored as int32: a rank keeps about 4k/N bytes of
    them, where whole int64 lists on every rank would be 8k."""
    indices, _ = _adapter_tensors(trained["adapter"])
    k = sum(t.numel() for t in indices.values())
    records = [json.loads(line) for line in trained["metrics"].read_text().splitlines()]
    delta = next(r for r in records if r.get("event") == "delta")
    assert delta["k"] == k
    for rank, r in enumerate(trained["results"]):
        shards = r["index_shards"]
        assert set(shards) == set(indices)
        for name, (dtype, local, full) in shards.items():
            assert dtype == "torch.int32" and full == indices[name].numel()
            assert local == math.ceil(full / WORLD)  # ZeRO-3's even split, padding included
        held = 4 * sum(local for _, local, _ in shards.values())
        assert delta["index_bytes_per_rank"][rank] == held
        assert 4 * k / WORLD <= held < 4 * (k / WORLD + len(shards))
        print(f"rank {rank}: {held} index bytes for k = {k} (4k/N = {4 * k / WORLD:.0f}; "
              f"whole int64 lists would be {8 * k})")


def reference_channel_scales(model, train_set, config: TrainConfig, names: list[str]) -> dict[str, torch.Tensor]:
    """--delta_scaling input_channel's s_j = median_j ||x_j|| / ||x_j|| (at most 100), ||x_j|| the norm of input
    channel j over every token of the 16 calibration examples (the first 16 of the seeded permutation), each
    run alone."""
    sums = {n: torch.zeros(model.get_submodule(n).in_features, dtype=torch.float64) for n in names}

    def add_squares(name: str):
        def hook(module, inputs):
            sums[name] += inputs[0][0].double().square().sum(0)
        return hook

    handles = [model.get_submodule(n).register_forward_pre_hook(add_squares(n)) for n in names]
    with torch.no_grad():
        for i in plain_permutation(len(train_set), config.seed)[:16]:
            model(torch.tensor([train_set[i]["input_ids"]]))
    for handle in handles:
        handle.remove()
    norms = {n: t.sqrt() for n, t in sums.items()}
    return {n: (norm.median() / norm.clamp_min(norm.median() / 100)).float() for n, norm in norms.items()}


def dense_reference_training(config: TrainConfig, indices: dict[str, torch.Tensor],
                             channel_scaled: bool = False) -> dict[str, torch.Tensor]:
    """Train dense deltas D (gradient masked to `indices`) in one process, the way 2 data-parallel ranks do:
    per step, the mean over ranks and accumulation steps of each micro-batch's mean token loss. The batches
    are its own (tests.references), not those of speft_ds.data.batches. With `channel_scaled` the trained
    parameter is theta and D = s_j x theta on input channel j."""
    model = AutoModelForCausalLM.from_pretrained(config.model, dtype=torch.float32).requires_grad_(False)
    train_set = plain_split(tokenize_dataset(load_raw_dataset(config), load_tokenizer(config), config),
                            config.val_size, config.seed)
    weights = {n: model.get_submodule(n).weight for n in indices}
    scales = (reference_channel_scales(model, train_set, config, list(indices)) if channel_scaled
              else {n: torch.ones(w.shape[1]) for n, w in weights.items()})
    thetas = {n: torch.zeros_like(w, requires_grad=True) for n, w in weights.items()}
    masks = {n: torch.zeros(w.numel()).index_fill_(0, indices[n], 1.0).view_as(w) for n, w in weights.items()}
    optimizer = torch.optim.AdamW(list(thetas.values()), lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    batches = plain_micro_batches(len(train_set), config.seed, WORLD, MICRO_BATCH)
    for step in range(STEPS):
        for micro in range(step * GRAD_ACC, (step + 1) * GRAD_ACC):
            for rank_examples in batches[micro]:
                loss = mean_token_loss(model, {n: weights[n] + scales[n] * thetas[n] for n in thetas},
                                       [train_set[i] for i in rank_examples])
                (loss / (WORLD * GRAD_ACC)).backward()
        for n, theta in thetas.items():
            theta.grad *= masks[n]
        torch.nn.utils.clip_grad_norm_(list(thetas.values()), MAX_NORM)
        optimizer.step()
        optimizer.zero_grad()
    return {n: weights[n] + scales[n] * thetas[n].detach() for n in thetas}


def test_trained_weights_match_dense_reference(trained):
    indices, values = _adapter_tensors(trained["adapter"])
    assert all(v.abs().max() > 0 for v in values.values()), "values never moved from zero"
    for r in trained["results"]:  # auto is the sparse product on CPU
        assert r["delta_impls"] == (["dense"] if trained["variant"] == "dense-delta" else ["auto"])
    reference = dense_reference_training(trained["config"], indices, trained["variant"] == "channel-scaled")
    base = AutoModelForCausalLM.from_pretrained(trained["config"].model, dtype=torch.float32)
    for name, ref_weight in reference.items():
        weight = base.get_submodule(name).weight.detach().clone()
        weight.view(-1)[indices[name]] += values[name]
        torch.testing.assert_close(weight, ref_weight, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("trained", ["mixed-mask"], indirect=True)
def test_a_mixed_mask_takes_each_weights_exact_share(trained):
    """--selection local --num_trainable: each weight's count is its largest-remainder share of k."""
    indices, _ = _adapter_tensors(trained["adapter"])
    shapes = json.loads((trained["adapter"] / "adapter_config.json").read_text())["shapes"]
    sizes = [rows * cols for rows, cols in shapes.values()]
    exact = [MIXED_K * size / sum(sizes) for size in sizes]
    floors = [math.floor(x) for x in exact]
    for i in sorted(range(len(sizes)), key=lambda i: (floors[i] - exact[i], i))[:MIXED_K - sum(floors)]:
        floors[i] += 1
    assert [indices[name].numel() for name in shapes] == floors


def test_adapter_written_under_zero3_reproduces_trained_logits(trained):
    trained_logits = trained["results"][0]["logits"]
    torch.testing.assert_close(trained["results"][1]["logits"], trained_logits)
    base = AutoModelForCausalLM.from_pretrained(trained["config"].model, dtype=torch.float32).eval()
    base_logits = base(trained["probe_ids"]).logits.detach()
    loaded = load_adapter(AutoModelForCausalLM.from_pretrained(trained["config"].model, dtype=torch.float32).eval(),
                          trained["adapter"])
    merged = merge_adapter(AutoModelForCausalLM.from_pretrained(trained["config"].model, dtype=torch.float32).eval(),
                           trained["adapter"])
    with torch.no_grad():
        torch.testing.assert_close(loaded(trained["probe_ids"]).logits, trained_logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(merged(trained["probe_ids"]).logits, trained_logits, rtol=1e-5, atol=1e-5)
    assert (base_logits - trained_logits).abs().max() > 1e-3, "the adapter changes nothing"
    assert not any(isinstance(m, (SparseDeltaLinear, SparseDeltaEmbedding)) for m in merged.modules())


def test_metrics_log_has_every_step_and_the_phases(trained):
    records = [json.loads(line) for line in trained["metrics"].read_text().splitlines()]
    assert [r["step"] for r in records if "event" not in r] == list(range(1, STEPS + 1))
    assert all({"loss", "lr", "step_time_s"} <= set(r) for r in records if "event" not in r)
    events = {r["event"]: r for r in records if "event" in r}
    assert events["salience"]["examples"] == 16
    assert events["selection"]["k"] == sum(t.numel() for t in _adapter_tensors(trained["adapter"])[0].values())
    assert math.isfinite(events["eval"]["eval_loss"])
    # The timed phases follow one another inside the run, so together they fit in its wall time.
    phases = [events[name]["wall_time_s"] for name in ("load", "salience", "selection", "training", "adapter")]
    assert all(t > 0 for t in phases) and sum(phases) < min(r["run_wall_s"] for r in trained["results"])
    memory = {r["phase"]: r for r in records if r.get("event") == "memory"}
    assert list(memory) == ["start", "load", "salience", "training", "eval and adapter"]
    for record in memory.values():  # MiB per rank: torch alone is > 100
        assert all(100 < peak < 20_000 for peak in record["peak_rss_mib_per_rank"])
        assert len(record["rss_mib_per_rank"]) == WORLD
        assert all(rss <= peak + 1 for rss, peak in zip(record["rss_mib_per_rank"], record["peak_rss_mib_per_rank"]))


def test_merge_cli_writes_a_model_from_pretrained_loads(trained):
    out = trained["root"] / "merged"
    proc = subprocess.run([sys.executable, "launch/merge.py", "--model", trained["config"].model,
                           "--adapter", str(trained["adapter"]), "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(trained["probe_ids"]).logits, trained["results"][0]["logits"],
                                   rtol=1e-5, atol=1e-5)
    # readable by a serving container under another user: every file 0644, the directories 0755
    for path in [out, *out.rglob("*"), trained["adapter"], *trained["adapter"].rglob("*")]:
        assert path.stat().st_mode & 0o777 == (0o755 if path.is_dir() else 0o644), path
    again = subprocess.run([sys.executable, "launch/merge.py", "--model", trained["config"].model,
                            "--adapter", str(trained["adapter"]), "--out", str(out)],
                           cwd=REPO, capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and "already exists" in again.stderr


def test_inspect_prints_the_adapters_table_and_writes_a_png(trained):
    png = trained["root"] / "mask.png"
    proc = subprocess.run([sys.executable, "launch/mask.py", str(trained["adapter"]), "--out", str(png)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    indices, _ = _adapter_tensors(trained["adapter"])
    adapter_config = json.loads((trained["adapter"] / "adapter_config.json").read_text())
    table = {line.split()[0]: line.split() for line in proc.stdout.splitlines()}
    for name, idx in indices.items():
        shape = adapter_config["shapes"][name]
        assert table[name][1:3] == [f"{shape[0]}x{shape[1]}", str(idx.numel())]
    image = matplotlib.pyplot.imread(png)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100

    summary = adapter_config["salience_summary"]
    targeted = round(adapter_config["k"] / adapter_config["density"])
    assert sum(summary["positive"]) + sum(summary["negative"]) + summary["zero"] == targeted
    assert summary["lowest_selected"] > 0


def test_generate_answers_merged_in_memory_and_unmerged_alike(trained):
    prompt = "Question: Tom has 3 pens. How many pens does Tom have?\nAnswer:"
    proc = subprocess.run([sys.executable, "launch/generate.py", "--model", trained["config"].model, "--adapter",
                           str(trained["adapter"]), "--prompt", prompt, "--max_new_tokens", "6"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    tokenizer = load_tokenizer(trained["config"])
    merged = merge_adapter(AutoModelForCausalLM.from_pretrained(trained["config"].model, dtype=torch.float32).eval(),
                           trained["adapter"])
    ids = torch.tensor([[tokenizer.bos_token_id] + tokenizer.encode(prompt, add_special_tokens=False)])
    prompt_length = ids.shape[1]
    with torch.no_grad():  # greedy decoding by hand on the merged model (stopping at EOS, as generate does)
        for _ in range(6):
            ids = torch.cat([ids, merged(ids).logits[:, -1:].argmax(-1)], dim=1)
            if ids[0, -1] == tokenizer.eos_token_id:
                break
    want = tokenizer.decode(ids[0, prompt_length:], skip_special_tokens=True)
    assert proc.stdout.removesuffix("\n") == want  # print adds one newline; the answer may end with its own
    prompt_file = trained["root"] / "prompt.txt"
    prompt_file.write_text(prompt)
    unmerged = subprocess.run([sys.executable, "launch/generate.py", "--model", trained["config"].model, "--adapter",
                               str(trained["adapter"]), "--prompt_file", str(prompt_file), "--max_new_tokens", "6",
                               "--unmerged"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert unmerged.returncode == 0 and unmerged.stdout == proc.stdout, unmerged.stderr[-2000:]
    literal = subprocess.run([sys.executable, "launch/generate.py", "--model", trained["config"].model, "--adapter",
                              str(trained["adapter"]), "--prompt", "Question: 2 + 2?\\nAnswer:"],
                             cwd=REPO, capture_output=True, text=True, timeout=300)
    assert literal.returncode == 2 and "--prompt holds a literal \\n, not a newline" in literal.stderr


def test_peft_s_own_loader_says_how_to_load_a_speft_adapter(trained):
    from peft import PeftModel

    base = AutoModelForCausalLM.from_pretrained(trained["config"].model, dtype=torch.float32)
    with pytest.raises(KeyError, match=r"speft_ds.load_adapter\(model, path\), or merge it into the base with "
                                       "speft-merge"):
        PeftModel.from_pretrained(base, str(trained["adapter"]))
