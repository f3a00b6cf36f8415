"""loss.py: summed cross-entropy over the predicted tokens, and its hand-written backward."""

import math

import torch

from mpnet_dist.data.batch import IGNORE_INDEX
from mpnet_dist.loss import prediction_loss


def test_loss_is_a_sum_over_real_targets_only():
    logits = torch.randn(2, 3, 7)
    targets = torch.tensor([[1, 2, IGNORE_INDEX], [3, IGNORE_INDEX, IGNORE_INDEX]])
    loss_sum, correct = prediction_loss(logits, targets)
    log_probs = logits.log_softmax(-1)
    expected = -(log_probs[0, 0, 1] + log_probs[0, 1, 2] + log_probs[1, 0, 3])
    assert torch.allclose(loss_sum, expected)
    assert 0 <= int(correct) <= 3
    assert math.isfinite(float(loss_sum))


def test_backward_equals_autograd_cross_entropy_and_ignores_padding():
    """The lean backward against torch's own (independent) cross-entropy, fp32 and bf16 logits."""
    for dtype, tol in ((torch.float32, 1e-6), (torch.bfloat16, 1e-2)):
        logits = torch.randn(3, 4, 11).to(dtype).requires_grad_()
        targets = torch.tensor([[1, 2, 3, IGNORE_INDEX], [4, 5, IGNORE_INDEX, IGNORE_INDEX], [6, 7, 8, 9]])
        loss_sum, _ = prediction_loss(logits, targets)
        (loss_sum * 0.5).backward()
        reference = logits.detach().float().requires_grad_()
        expected = torch.nn.functional.cross_entropy(
            reference.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
        )
        (expected * 0.5).backward()
        assert torch.allclose(loss_sum.float(), expected, atol=tol), dtype
        assert logits.grad.dtype == dtype
        assert torch.allclose(logits.grad.float(), reference.grad, atol=tol), dtype
        assert torch.all(logits.grad[targets == IGNORE_INDEX] == 0)
