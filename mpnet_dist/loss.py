"""Loss on the predicted tokens: summed cross-entropy, normalized by the global count of predicted tokens."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

IGNORE = -100  # targets of slots that predict nothing (padding in one-document-per-row mode)
LN2 = math.log(2.0)


def prediction_loss(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed cross-entropy (nats, fp32) and number of correct predictions.

    logits [B, p, V], targets [B, p]. Sum, not mean: the caller divides by the number of predicted tokens
    across all micro-batches of the step and all ranks, so every token weighs the same however they are split.
    """
    flat = logits.float().reshape(-1, logits.shape[-1])  # [B*p, V]
    flat_targets = targets.reshape(-1)
    loss_sum = F.cross_entropy(flat, flat_targets, ignore_index=IGNORE, reduction="sum")
    with torch.no_grad():
        correct = ((flat.argmax(dim=-1) == flat_targets) & (flat_targets != IGNORE)).sum()
    return loss_sum, correct


def count_predictions(targets: torch.Tensor) -> int:
    return int((targets != IGNORE).sum())
