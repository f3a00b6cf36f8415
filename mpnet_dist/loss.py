"""Loss on the predicted tokens: summed cross-entropy, normalized by the global count of predicted tokens."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

# IGNORE_INDEX: the target of slots that predict nothing (padding in one-document-per-row mode).
from mpnet_dist.data.batch import IGNORE_INDEX

# Vocabulary columns per chunk of the fused CPU head. Measured (benchmarks/head_chunks.py, 304 x 256 rows against
# 30,527 x 256): head and loss forward + backward 233 ms in 1,024-column chunks against 320 ms whole at 1 thread,
# 125 against 157 at 2; chunks of 512-4,096 were within noise of each other (BENCHMARKS.md, "Fused head chunk size").
CPU_VOCAB_CHUNK = 1024


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


def projection_loss(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, targets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """prediction_loss(F.linear(hidden, weight, bias), targets): the LM head's vocabulary projection and the loss.

    hidden [B, p, H], weight [V, H] (the tied word embeddings), bias [V], targets [B, p]. On a CPU in fp32 and
    eager mode the two run fused, a chunk of the vocabulary at a time (`_ChunkedProjectionLoss`). Elsewhere (CUDA,
    autocast, bf16 weights, torch.compile) the plain composition runs: measured only on this CPU so far.
    """
    fused = (
        hidden.device.type == "cpu"
        and hidden.dtype == weight.dtype == bias.dtype == torch.float32
        and not torch.is_autocast_enabled("cpu")
        and not torch.compiler.is_compiling()
    )
    if not fused:
        return prediction_loss(F.linear(hidden, weight, bias), targets)
    return _ChunkedProjectionLoss.apply(
        hidden.reshape(-1, hidden.shape[-1]), weight, bias, targets.reshape(-1), CPU_VOCAB_CHUNK
    )


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


class _ChunkedProjectionLoss(torch.autograd.Function):
    """(summed CE, correct) of hidden [N, H] @ weight[V, H].T + bias, one vocabulary chunk of columns at a time.

    Why: on CPU MKL runs the [N, H] x [H, V] product faster in 1,024-column pieces than whole, and working per
    chunk keeps each piece in cache for the passes after it: the row maximum, the exponentials and
    (in backward) softmax - one_hot and the two gradient products. The [N, V] logits never exist in one piece
    and no log-softmax, argmax or copy pass runs over them; the exponentials kept for backward take the memory
    the log-probabilities took before. Results equal the composition within fp32 rounding (tests/test_loss.py).
    Backward runs once (it normalizes the saved chunks in place).
    """

    @staticmethod
    def forward(ctx: Any, hidden, weight, bias, targets, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
        rows, vocab = hidden.shape[0], weight.shape[0]
        valid = targets != IGNORE_INDEX
        target = torch.where(valid, targets, -1)  # -1: in no chunk
        picked = hidden.new_zeros(rows)
        # Largest logit left of the target inside the target's chunk: with `picked` and the chunk maxima it
        # tells whether argmax (the first maximum) is the target, without max(dim=1)'s index, which runs
        # unvectorized on CPU (750 us a chunk against 36 for amax at 304 x 1,024).
        earlier = hidden.new_full((rows,), -torch.inf)
        columns = torch.arange(chunk, device=hidden.device)
        starts, pieces, maxima = range(0, vocab, chunk), [], []
        for start in starts:
            logits = torch.addmm(bias[start : start + chunk], hidden, weight[start : start + chunk].t())
            maxima.append(logits.amax(dim=1))  # NaN if the row has one
            local, inside = _in_chunk(target, start, logits.shape[1])
            picked += torch.where(inside, logits.gather(1, local).squeeze(1), 0.0)
            here = inside.nonzero().squeeze(1)  # rows whose target is in this chunk: about rows / chunks
            if here.numel():
                left = columns[: logits.shape[1]] >= local[here]  # [k, C]: the target's column and after
                earlier[here] = logits[here].masked_fill_(left, -torch.inf).amax(dim=1)
            pieces.append(logits)
        maxima = torch.stack(maxima)  # [chunks, N]
        best = maxima.amax(dim=0)
        before = torch.arange(len(pieces), device=hidden.device)[:, None] < (target // chunk)[None, :]
        earlier = torch.maximum(earlier, torch.where(before, maxima, -torch.inf).amax(dim=0))
        sum_exp = hidden.new_zeros(rows)
        for logits in pieces:
            sum_exp += logits.sub_(best[:, None]).exp_().sum(dim=1)  # a NaN logit makes the loss NaN
        loss = torch.where(valid, best + sum_exp.log() - picked, 0.0).sum()
        # argmax == target: the target holds the row maximum and nothing before it does (ties: the first wins)
        correct = (valid & (picked == best) & (earlier < best)).sum()
        ctx.mark_non_differentiable(correct)
        ctx.chunk = chunk
        ctx.save_for_backward(hidden, weight, target, valid, sum_exp, *pieces)
        return loss, correct

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor, _: Any) -> tuple[Any, ...]:
        hidden, weight, target, valid, sum_exp, *pieces = ctx.saved_tensors
        # d loss / d logits = grad * (softmax - one_hot) on valid rows; ignored rows get exactly 0.
        scale = torch.where(valid, grad / sum_exp, 0.0)[:, None]
        one_hot = torch.where(valid, -grad, 0.0)[:, None]
        grad_hidden = torch.zeros_like(hidden)
        grad_weight, grad_bias = torch.empty_like(weight), weight.new_empty(weight.shape[0])
        for number, exps in enumerate(pieces):
            start = number * ctx.chunk
            end = start + exps.shape[1]
            local, inside = _in_chunk(target, start, exps.shape[1])
            grad_logits = exps.mul_(scale)
            grad_logits.scatter_add_(1, local, torch.where(inside[:, None], one_hot, 0.0))
            grad_hidden.addmm_(grad_logits, weight[start:end])
            torch.mm(grad_logits.t(), hidden, out=grad_weight[start:end])
            torch.sum(grad_logits, dim=0, out=grad_bias[start:end])
        return grad_hidden, grad_weight, grad_bias, None, None


def _in_chunk(target: torch.Tensor, start: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's target column inside the chunk [start, start + width) ([N, 1], clamped), and whether it is."""
    local = target - start
    inside = (local >= 0) & (local < width)
    return local.clamp(0, width - 1)[:, None], inside
