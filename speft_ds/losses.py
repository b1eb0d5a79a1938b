"""The causal-LM token loss, as a sum plus a token count so callers choose the normalisation."""

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def causal_lm_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over labels != -100, and the number of such tokens."""
    shift_logits = logits[:, :-1].reshape(-1, logits.size(-1)).float()
    shift_labels = labels[:, 1:].reshape(-1)
    loss_sum = F.cross_entropy(shift_logits, shift_labels, ignore_index=IGNORE_INDEX, reduction="sum")
    return loss_sum, int((shift_labels != IGNORE_INDEX).sum())
