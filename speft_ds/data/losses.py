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


def per_example_mean_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum over the batch of each example's mean token loss (examples without loss tokens add 0)."""
    shift_labels = labels[:, 1:]
    token_loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)).float(), shift_labels.reshape(-1),
                                 ignore_index=IGNORE_INDEX, reduction="none").view_as(shift_labels)
    counts = (shift_labels != IGNORE_INDEX).sum(dim=1).clamp(min=1)
    return (token_loss.sum(dim=1) / counts).sum()
