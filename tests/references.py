"""Dense single-process references in plain torch (no speft_ds code), and the inputs they share."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

MICRO_BATCH = 2


def zero3_config(world_size: int) -> dict:
    return {"train_micro_batch_size_per_gpu": MICRO_BATCH, "gradient_accumulation_steps": 1,
            "train_batch_size": MICRO_BATCH * world_size, "bf16": {"enabled": False},
            "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}


def random_examples(vocab: int, n: int = 11, seed: int = 1) -> list[dict]:
    """Random token sequences of varied length; the first few tokens of each carry no loss (a 'prompt')."""
    g = torch.Generator().manual_seed(seed)
    examples = []
    for _ in range(n):
        length = int(torch.randint(6, 20, (1,), generator=g))
        ids = torch.randint(3, vocab, (length,), generator=g).tolist()
        prompt = int(torch.randint(1, 4, (1,), generator=g))
        examples.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return examples


def dense_gradient(model: nn.Module, examples: list[dict], names: list[str]) -> dict[str, torch.Tensor]:
    """d loss / d W (flattened) for the named modules, loss = summed token loss / total loss tokens."""
    model.requires_grad_(False)
    linears = {n: model.get_submodule(n) for n in names}
    for m in linears.values():
        m.weight.requires_grad_(True)
        m.weight.grad = None
    total = sum(sum(1 for t in e["labels"][1:] if t != -100) for e in examples)
    for e in examples:
        logits = model(torch.tensor([e["input_ids"]])).logits[0]
        loss = F.cross_entropy(logits[:-1], torch.tensor(e["labels"][1:]), ignore_index=-100, reduction="sum")
        (loss / total).backward()
    scores = {n: m.weight.grad.flatten().clone() for n, m in linears.items()}
    model.requires_grad_(False)
    return scores


def reference_top_k(scores: list[torch.Tensor], k: int) -> tuple[list[set], float]:
    """Top-k of the concatenation: score descending, then (module order, flat index) ascending."""
    flat = torch.cat(scores)
    order = torch.sort(-flat, stable=True).indices[:k]
    offsets = torch.tensor([0] + [s.numel() for s in scores]).cumsum(0)
    chosen = [set() for _ in scores]
    for pos in order.tolist():
        module = int(torch.searchsorted(offsets, pos, right=True)) - 1
        chosen[module].add(pos - int(offsets[module]))
    return chosen, float(flat[order[-1]])


def reference_capped_top_k(scores: list[torch.Tensor], caps: list[int], k: int) -> tuple[list[set], float]:
    """reference_top_k after a cap per column: of each [rows, columns] weight, only the `cap` highest entries
    of each column (score descending, then row ascending) stay selectable; the rest score -inf."""
    capped = []
    for weight, cap in zip(scores, caps):
        keep = torch.zeros(weight.shape, dtype=torch.bool)
        for column in range(weight.shape[1]):
            keep[torch.sort(-weight[:, column], stable=True).indices[:cap], column] = True
        capped.append(torch.where(keep, weight, float("-inf")).flatten())
    return reference_top_k(capped, k)


def decoder_linears(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"]


def dense_fisher(model: nn.Module, examples: list[dict], names: list[str]) -> dict[str, torch.Tensor]:
    """(1/N) sum_i (d loss_i / dW)^2, loss_i = mean token loss of example i, one backward per example."""
    model.requires_grad_(False)
    weights = {n: model.get_submodule(n).weight.requires_grad_(True) for n in names}
    total = {n: torch.zeros(w.numel()) for n, w in weights.items()}
    for e in examples:
        logits = model(torch.tensor([e["input_ids"]])).logits[0]
        loss = F.cross_entropy(logits[:-1], torch.tensor(e["labels"][1:]), ignore_index=-100)
        grads = torch.autograd.grad(loss, list(weights.values()))
        for n, g in zip(weights, grads):
            total[n] += g.flatten().square()
    model.requires_grad_(False)
    return {n: t / len(examples) for n, t in total.items()}


def dense_example_moments(model: nn.Module, examples: list[dict],
                          names: list[str]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(sum_i g_i, sum_i g_i^2), g_i = d loss_i / dW with loss_i the mean token loss of example i."""
    model.requires_grad_(False)
    weights = {n: model.get_submodule(n).weight.requires_grad_(True) for n in names}
    sums = {n: torch.zeros(w.numel(), dtype=torch.float64) for n, w in weights.items()}
    squares = {n: torch.zeros(w.numel(), dtype=torch.float64) for n, w in weights.items()}
    for e in examples:
        logits = model(torch.tensor([e["input_ids"]])).logits[0]
        loss = F.cross_entropy(logits[:-1], torch.tensor(e["labels"][1:]), ignore_index=-100)
        for n, g in zip(weights, torch.autograd.grad(loss, list(weights.values()))):
            sums[n] += g.flatten().double()
            squares[n] += g.flatten().double().square()
    model.requires_grad_(False)
    return {n: t.float() for n, t in sums.items()}, {n: t.float() for n, t in squares.items()}


def dense_synflow(model: nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    """|W * g'| with every parameter made non-negative, F.silu replaced by the identity (as the paper's
    code patches torch.nn.functional) and one all-ones input embedding; g' = d sum(logits) / dW."""
    saved = {n: p.detach().clone() for n, p in model.named_parameters()}
    silu = F.silu
    try:
        F.silu = lambda x, inplace=False: x
        with torch.no_grad():
            for p in model.parameters():
                p.abs_()
        weights = [model.get_submodule(n).weight.requires_grad_(True) for n in names]
        ones = torch.ones(1, 1, model.config.hidden_size, dtype=model.dtype)
        grads = torch.autograd.grad(model(inputs_embeds=ones).logits.sum(), weights)
        scores = {n: (w.detach() * g).abs().flatten() for n, w, g in zip(names, weights, grads)}
    finally:
        F.silu = silu
        model.requires_grad_(False)
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(saved[n])
    return scores


def dense_hessian_gradient(model: nn.Module, examples: list[dict], names: list[str]) -> dict[str, torch.Tensor]:
    """H g exactly, by double backward: g = d loss / dW (loss as in dense_gradient), H g = d (g . stop(g)) / dW."""
    model.requires_grad_(False)
    weights = [model.get_submodule(n).weight.requires_grad_(True) for n in names]
    total = sum(sum(1 for t in e["labels"][1:] if t != -100) for e in examples)
    loss = 0
    for e in examples:
        logits = model(torch.tensor([e["input_ids"]])).logits[0]
        loss = loss + F.cross_entropy(logits[:-1], torch.tensor(e["labels"][1:]), ignore_index=-100,
                                      reduction="sum") / total
    grads = torch.autograd.grad(loss, weights, create_graph=True)
    dot = sum((g * g.detach()).sum() for g in grads)
    hessian_grads = torch.autograd.grad(dot, weights)
    model.requires_grad_(False)
    return {n: hg.flatten() for n, hg in zip(names, hessian_grads)}


def plain_split(tokenized, val_size: float, seed: int):
    """The training split, taken with `datasets`' own seeded split."""
    return tokenized.train_test_split(test_size=val_size, seed=seed, shuffle=True)["train"]


def plain_permutation(n: int, seed: int) -> list[int]:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()


def plain_micro_batches(n_train: int, seed: int, world_size: int, micro_batch_size: int) -> list[list[list[int]]]:
    """[micro-batch][rank] -> example indices of the first epoch, as the README defines the order: a
    permutation seeded with --seed, cut into consecutive global micro-batches of micro_batch_size x ranks
    examples (a partial last one dropped), rank r taking the r-th slice of each."""
    order, size = plain_permutation(n_train, seed), micro_batch_size * world_size
    return [[order[start + r * micro_batch_size:start + (r + 1) * micro_batch_size] for r in range(world_size)]
            for start in range(0, n_train - size + 1, size)]


def mean_token_loss(model: nn.Module, weights: dict[str, torch.Tensor], examples: list[dict]) -> torch.Tensor:
    """Mean token loss of `examples` as one right-padded batch, with `weights` (module name -> weight) in
    place of those modules' own."""
    length = max(len(e["input_ids"]) for e in examples)
    ids = torch.tensor([e["input_ids"] + [0] * (length - len(e["input_ids"])) for e in examples])
    labels = torch.tensor([e["labels"] + [-100] * (length - len(e["labels"])) for e in examples])
    mask = (torch.arange(length) < torch.tensor([len(e["input_ids"]) for e in examples])[:, None]).long()
    merged = {f"{name}.weight": w for name, w in weights.items()}
    logits = functional_call(model, merged, (ids,), {"attention_mask": mask}).logits
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1), ignore_index=-100)
