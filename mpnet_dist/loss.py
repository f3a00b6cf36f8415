"""Loss on the predicted tokens: summed cross-entropy, normalized by the global count of predicted tokens."""

from __future__ import annotations

from typing import Any

import torch

# IGNORE_INDEX: the target of slots that predict nothing (padding in one-document-per-row mode).
from mpnet_dist.data.batch import IGNORE_INDEX


def prediction_loss(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed cross-entropy (nats, fp32) and number of correct predictions.

    logits [B, p, V], targets [B, p]. Sum, not mean: the caller divides by the number of predicted tokens
    across all micro-batches of the step and all ranks, so every token weighs the same however they are split.
    """
    flat = logits.reshape(-1, logits.shape[-1])  # [B*p, V]
    flat_targets = targets.reshape(-1)
    loss_sum = _SummedCrossEntropy.apply(flat, flat_targets)
    with torch.no_grad():
        correct = ((flat.argmax(dim=-1) == flat_targets) & (flat_targets != IGNORE_INDEX)).sum()
    return loss_sum, correct


class _SummedCrossEntropy(torch.autograd.Function):
    """F.cross_entropy(logits.float(), targets, ignore_index=IGNORE_INDEX, reduction="sum"), with a leaner backward.

    The [N, V] tensors dominate the loss: autograd's path fills a zero [N, V] gradient for nll_loss and then
    runs log_softmax's backward into another one. Here backward turns the saved fp32 log-probabilities into
    the gradient in place, softmax - one_hot, scaled by the incoming gradient: one buffer, fewer passes.
    """

    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        log_probs = torch.log_softmax(logits, dim=-1, dtype=torch.float32)  # [N, V] fp32
        valid = targets != IGNORE_INDEX
        index = torch.where(valid, targets, 0)[:, None]  # [N, 1]; ignored rows read class 0, then drop it
        picked = log_probs.gather(1, index).squeeze(1)  # [N]
        ctx.save_for_backward(log_probs, index, valid)
        ctx.logits_dtype = logits.dtype
        return -torch.where(valid, picked, 0.0).sum()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        log_probs, index, valid = ctx.saved_tensors
        grad_logits = log_probs.exp_()  # softmax, in the saved buffer (backward runs once)
        grad_logits.scatter_add_(1, index, grad_logits.new_full(index.shape, -1.0))
        # Ignored rows get exactly 0 even when grad is NaN/Inf, as autograd's nll_loss backward gives them.
        grad_logits.mul_(torch.where(valid, grad, 0.0)[:, None])
        return grad_logits.to(ctx.logits_dtype), None
