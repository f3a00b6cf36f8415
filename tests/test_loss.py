"""loss.py: summed cross-entropy over the predicted tokens, its hand-written backward, and the fused CPU head."""

import math

import pytest
import torch

from mpnet_dist.data.batch import IGNORE_INDEX
from mpnet_dist.loss import CPU_VOCAB_CHUNK, _ChunkedProjectionLoss, prediction_loss
from tests.helpers import random_batch, tiny_model


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


def _reference(hidden, weight, bias, targets):
    """Independent: torch's own linear and cross-entropy, autograd's backward, argmax."""
    logits = torch.nn.functional.linear(hidden, weight, bias)
    loss = torch.nn.functional.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")
    correct = ((logits.argmax(-1) == targets) & (targets != IGNORE_INDEX)).sum()
    return loss, correct


def _leaves(*tensors):
    return [t.detach().clone().requires_grad_() for t in tensors]


@pytest.mark.parametrize("chunk", [7, 16, CPU_VOCAB_CHUNK])
def test_fused_head_equals_linear_then_cross_entropy(chunk):
    """The chunked CPU head (projection + loss + argmax fused) against torch's linear + cross_entropy: loss,
    correct count and the gradients of the hidden states, the tied weight and the bias. Targets sit on chunk
    edges, the last chunk is partial, some rows are ignored."""
    torch.manual_seed(0)
    rows, dim, vocab = 24, 8, 45
    hidden, weight, bias = torch.randn(rows, dim), torch.randn(vocab, dim), torch.randn(vocab)
    targets = torch.randint(0, vocab, (rows,))
    targets[:6] = torch.tensor([0, 6, 7, 15, 16, vocab - 1])
    targets[6:9] = IGNORE_INDEX
    fused_in, reference_in = _leaves(hidden, weight, bias), _leaves(hidden, weight, bias)
    loss, correct = _ChunkedProjectionLoss.apply(*fused_in, targets, chunk)
    expected, expected_correct = _reference(*reference_in, targets)
    (loss * 0.5).backward()
    (expected * 0.5).backward()
    assert torch.allclose(loss, expected, rtol=1e-6) and int(correct) == int(expected_correct)
    for got, want in zip(fused_in, reference_in, strict=True):
        assert torch.allclose(got.grad, want.grad, rtol=1e-5, atol=1e-6)


def test_fused_head_counts_ties_and_nan_as_argmax_and_cross_entropy_do():
    dim, vocab = 4, 20
    weight = torch.zeros(vocab, dim)
    bias = torch.zeros(vocab)
    bias[[3, 12]] = 1.0  # two equal maxima in different chunks: argmax takes the first
    hidden = torch.zeros(3, dim)
    targets = torch.tensor([3, 12, IGNORE_INDEX])
    loss, correct = _ChunkedProjectionLoss.apply(hidden, weight, bias, targets, 8)
    expected, expected_correct = _reference(hidden, weight, bias, targets)
    assert int(correct) == int(expected_correct) == 1 and torch.allclose(loss, expected)
    bias[5] = math.nan  # a NaN logit on a predicted row gives a NaN loss (the trainer's NaN policy needs it)
    assert math.isnan(float(_ChunkedProjectionLoss.apply(hidden, weight, bias, targets, 8)[0]))


@pytest.mark.parametrize("chunk", [1, 3, 8, 64])
def test_fused_head_correct_count_is_argmax_with_many_ties(chunk):
    # Small integer logits tie often, inside a chunk and across chunks: only a target that is the *first*
    # maximum of its row counts as correct, as argmax(logits) == target does.
    torch.manual_seed(1)
    rows, dim, vocab = 400, 2, 30
    hidden = torch.randint(-1, 2, (rows, dim)).float()
    weight, bias = torch.randint(-1, 2, (vocab, dim)).float(), torch.zeros(vocab)
    logits = hidden @ weight.t()
    targets = torch.where(torch.rand(rows) < 0.5, logits.argmax(dim=1), torch.randint(0, vocab, (rows,)))
    targets[:20] = IGNORE_INDEX
    first = (logits == logits.amax(dim=1, keepdim=True)).float().argmax(dim=1)  # first maximum of each row
    tied_later = (logits.gather(1, targets.clamp(min=0)[:, None]).squeeze(1) == logits.amax(dim=1)) & (
        first != targets
    )
    assert (
        tied_later[20:].sum() > 20
    )  # the case under test occurs: targets on a maximum that is not the first
    _, correct = _ChunkedProjectionLoss.apply(hidden, weight, bias, targets, chunk)
    _, expected = _reference(hidden, weight, bias, targets)
    assert int(correct) == int(expected) > 0


def test_model_loss_is_the_same_on_every_path():
    """The model's fused loss (CPU fp32) equals its logits fed to prediction_loss, and the unfused path (what
    CUDA, autocast and torch.compile run) gives the same numbers too."""
    model = tiny_model().train()
    input_ids, positions = random_batch(3, 12, 4)
    targets = input_ids[:, -4:].clone()
    targets[0, 1] = IGNORE_INDEX
    results = []
    for fused in (True, False):
        torch.manual_seed(1)  # the same dropout masks
        model.zero_grad(set_to_none=True)
        if fused:
            loss, correct = model(input_ids, positions, 4, None, targets)
        else:
            loss, correct = prediction_loss(model(input_ids, positions, 4), targets)
        loss.backward()
        results.append(
            (loss.detach(), int(correct), {n: p.grad.clone() for n, p in model.named_parameters()})
        )
    (fused_loss, fused_correct, fused_grads), (plain_loss, plain_correct, plain_grads) = results
    assert torch.allclose(fused_loss, plain_loss, rtol=1e-6) and fused_correct == plain_correct
    for name, grad in plain_grads.items():
        assert torch.allclose(fused_grads[name], grad, rtol=1e-4, atol=1e-6), name


def test_sparse_word_embedding_gradient_reaches_the_optimizer_dense_and_equal():
    """On CPU the word-embedding lookup has a sparse gradient (mpnet.WordEmbedding); summed with the tied head's
    dense one, the optimizer must see one dense gradient equal to the all-dense computation (padding included)."""
    model = tiny_model().train()
    input_ids, positions = random_batch(3, 12, 4)
    input_ids[0, :2] = model.config.padding_idx
    targets = input_ids[:, -4:].clone()
    embedding = model.sentence_encoder.embed_tokens
    grads = []
    for dense in (False, True):
        if dense:  # the plain lookup, as on CUDA and under torch.compile
            embedding.forward = lambda ids: torch.nn.functional.embedding(
                ids, embedding.weight, embedding.padding_idx
            )
        torch.manual_seed(1)
        model.zero_grad(set_to_none=True)
        model(input_ids, positions, 4, None, targets)[0].backward()
        assert not embedding.weight.grad.is_sparse
        grads.append(embedding.weight.grad.clone())
    assert torch.allclose(grads[0], grads[1], rtol=1e-5, atol=1e-7)
