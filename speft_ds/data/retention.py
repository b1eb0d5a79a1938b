"""--retention_text: how much of what the base model knew a run keeps (forgetting), measured on a text that
has nothing to do with the task.

The text (a plain-text file as one document, or a .jsonl file with a `text` field per line, each line a
document) is framed as training frames text (BOS, then its tokens) and cut into rows of --seq_len tokens.
Scored before training, every --eval_steps and after it: the mean next-token loss over every predicted
token, and, where the method can switch its update off cheaply (Method.without_update), the mean
KL(base || tuned) of the next-token distributions at those tokens, with the base's distribution from the
same model with the update off. Under ZeRO-3 each rank scores its share of the rows and the sums are
reduced, so the figures do not depend on the number of ranks.
"""

from __future__ import annotations

import json
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..config import ConfigError
from .batches import model_inputs, prompt_ids, rank_batches
from .losses import IGNORE_INDEX, causal_lm_loss_sum


def read_documents(path: str | Path, flag: str = "--retention_text") -> list[str]:
    """The documents of a text file (`flag` names it in errors): the whole text of a plain file, or each
    line's `text` of a .jsonl."""
    path = Path(path)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{flag} {path} is not a readable text file ({err}): fix or replace it") from None
    if path.suffix.lower() != ".jsonl":
        documents = [text]
    else:
        documents = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ConfigError(f"{flag} {path}, line {number}: not JSON ({err.msg}): fix that "
                                  "line") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise ConfigError(f"{flag} {path}, line {number}: no string field `text`: give each "
                                  "line {\"text\": ...}")
            documents.append(record["text"])
    if not any(d.strip() for d in documents):
        raise ConfigError(f"{flag} {path} holds no text: pass a file with some")
    return documents


def retention_rows(path: str | Path, tokenizer, seq_len: int) -> list[dict]:
    """--retention_text cut into rows (text_rows)."""
    return text_rows(read_documents(path), tokenizer, seq_len)


def text_rows(documents: list[str], tokenizer, seq_len: int) -> list[dict]:
    """Each document's tokens (BOS first) cut into rows of at most seq_len tokens; a last piece of one token,
    which predicts nothing, is dropped."""
    rows = []
    for document in documents:
        ids = prompt_ids(tokenizer, document)
        for start in range(0, len(ids), seq_len):
            piece = ids[start:start + seq_len]
            if len(piece) > 1:
                rows.append({"input_ids": piece, "labels": piece})
    return rows


KL_POSITIONS = 256  # positions per piece: a piece's distributions take KL_POSITIONS x vocabulary x 4 bytes, thrice


def _kl_sum(base_logits: torch.Tensor, tuned_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed KL(base || tuned) of the next-token distributions at the predicted positions, a few hundred
    positions at a time: whole rows' distributions at a large vocabulary would take gigabytes."""
    keep = (labels[:, 1:] != IGNORE_INDEX).reshape(-1)
    base_all = base_logits[:, :-1].reshape(-1, base_logits.size(-1))[keep]
    tuned_all = tuned_logits[:, :-1].reshape(-1, tuned_logits.size(-1))[keep]
    total = torch.zeros((), dtype=torch.float64, device=base_logits.device)
    for start in range(0, base_all.size(0), KL_POSITIONS):
        base = F.log_softmax(base_all[start:start + KL_POSITIONS].float(), dim=-1)
        tuned = F.log_softmax(tuned_all[start:start + KL_POSITIONS].float(), dim=-1)
        total += (base.exp() * (base - tuned)).sum(dtype=torch.float64)
    return total


@torch.no_grad()
def score_retention(model, rows: list[dict], micro_batch_size: int, pad_id: int, device: torch.device,
                    without_update: Callable[[], AbstractContextManager | None]) -> dict:
    """{"loss", "kl", "tokens"} of `model` (plain, or under ZeRO-3 with every rank calling this) on `rows`;
    `kl` is None where `without_update()` gives no context. Every rank returns the same figures."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    was_training = model.training
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, KL sum, tokens
    has_kl = without_update() is not None
    for batch in rank_batches(rows, list(range(len(rows))), rank, world, micro_batch_size, pad_id):
        batch = {key: value.to(device) for key, value in batch.items()}
        logits = model(**model_inputs(batch), use_cache=False).logits
        loss_sum, tokens = causal_lm_loss_sum(logits, batch["labels"])
        kl_sum = torch.zeros((), dtype=torch.float64, device=device)
        if has_kl:
            with without_update():
                base_logits = model(**model_inputs(batch), use_cache=False).logits
            kl_sum = _kl_sum(base_logits, logits, batch["labels"])
        totals += torch.stack([loss_sum.double(), kl_sum, torch.tensor(tokens, dtype=torch.float64, device=device)])
    model.train(was_training)
    if world > 1:
        dist.all_reduce(totals)
    tokens = int(totals[2].item())
    return {"loss": (totals[0] / tokens).item(), "kl": (totals[1] / tokens).item() if has_kl else None,
            "tokens": tokens}
