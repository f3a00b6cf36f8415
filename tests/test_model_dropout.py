"""Tests for mpnet_dist.model.dropout and the CPU attention path that uses it: the masks have the requested
keep rate, are unbiased and independent, follow torch's seed and RNG state, and attention with them is the
math torch's SDPA computes."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mpnet_dist.model.attention import SDPAKernel, math_attention
from mpnet_dist.model.dropout import CODES, Dropout, dropout, keep_mask
from tests.helpers import random_batch, tiny_model


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_keep_rate_is_the_requested_one_and_the_output_unbiased(p):
    torch.manual_seed(0)
    x = torch.ones(1000, 1000)
    out = dropout(x, p)
    kept = out != 0
    keep = round((1 - p) * CODES) / CODES
    sigma = math.sqrt(keep * (1 - keep) / x.numel())
    assert abs(kept.float().mean().item() - keep) < 5 * sigma
    assert abs(keep - (1 - p)) <= 0.5 / CODES  # the rate is rounded to a multiple of 2^-16, no further
    # every kept element is scaled by the inverse of the rate actually used: E[out] = x exactly
    assert torch.all(out[kept] == 1 / keep)
    assert abs(out.mean().item() - 1.0) < 5 * sigma / keep


def test_masks_of_neighbouring_elements_are_independent():
    # Four elements share one 64-bit draw: each of the four slots must be a fair coin of its own.
    torch.manual_seed(1)
    mask = keep_mask(torch.Size([400_000]), CODES // 2, torch.float32) > 0  # keep 1/2
    slots = mask.view(-1, 4).float()
    sigma = math.sqrt(0.25 / slots.size(0))
    for slot in range(4):
        assert abs(slots[:, slot].mean().item() - 0.5) < 5 * sigma, slot
    for a, b in ((0, 1), (1, 2), (2, 3), (3, 0)):  # same draw, and across draws (slot 3 -> next slot 0)
        both = (
            (slots[:, a] * slots[:, b]).mean().item() if b else (slots[:-1, 3] * slots[1:, 0]).mean().item()
        )
        assert abs(both - 0.25) < 5 * sigma, (a, b)


def test_masks_follow_the_seed_and_the_saved_rng_state():
    x = torch.randn(64, 33)
    torch.manual_seed(7)
    first = dropout(x, 0.3)
    state = torch.get_rng_state()  # what a checkpoint saves
    second = dropout(x, 0.3)
    assert not torch.equal(first, second)  # the generator advanced
    torch.set_rng_state(state)
    assert torch.equal(dropout(x, 0.3), second)  # a resumed run draws the same masks
    torch.manual_seed(7)
    assert torch.equal(dropout(x, 0.3), first)


def test_no_dropout_outside_training_and_gradient_is_the_mask():
    x = torch.randn(5, 7, requires_grad=True)
    assert dropout(x, 0.4, training=False) is x
    assert dropout(x, 0.0) is x
    module = Dropout(0.4).eval()
    assert module(x) is x
    out = module.train()(x)
    out.sum().backward()
    scale = CODES / round(0.6 * CODES)
    torch.testing.assert_close(x.grad, (out != 0).float() * scale, atol=0, rtol=0)
    assert torch.equal(dropout(x, 1.0), torch.zeros_like(x))  # p = 1 falls back to F.dropout


def test_cpu_masks_are_drawn_four_per_random_word(monkeypatch):
    # One int64 draw per four elements, no bernoulli_: the cost this module exists to avoid.
    calls = []
    bernoulli = torch.Tensor.bernoulli_
    monkeypatch.setattr(torch.Tensor, "bernoulli_", lambda *a, **k: calls.append(1) or bernoulli(*a, **k))
    before = torch.get_rng_state()
    dropout(torch.ones(2, 3, 5), 0.1)
    assert calls == []
    torch.set_rng_state(before)
    torch.empty(8, dtype=torch.int64).random_(-(2**63), None)  # ceil(30 / 4) = 8 words
    advanced = torch.get_rng_state()
    torch.set_rng_state(before)
    dropout(torch.ones(2, 3, 5), 0.1)
    assert torch.equal(torch.get_rng_state(), advanced)


def _qkv(batch=2, heads=3, rows=9, cols=7, dim=8):
    torch.manual_seed(3)
    q = torch.randn(batch, rows, heads, dim).transpose(1, 2).requires_grad_()  # as the model's views
    k = torch.randn(batch, cols, heads, dim).transpose(1, 2).requires_grad_()
    v = torch.randn(batch, cols, heads, dim).transpose(1, 2).requires_grad_()
    mask = torch.randn(batch, heads, rows, cols, requires_grad=True)
    return q, k, v, mask


@pytest.mark.parametrize("broadcast_mask", [False, True])
def test_math_attention_is_sdpa_without_dropout(broadcast_mask):
    q, k, v, mask = _qkv()
    used = mask[:1] if broadcast_mask else mask
    ours = math_attention(q, k, v, used, 0.0)
    theirs = F.scaled_dot_product_attention(q, k, v, attn_mask=used)
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-5)
    grads = torch.autograd.grad(ours.square().sum(), (q, k, v, mask))
    expected = torch.autograd.grad(theirs.square().sum(), (q, k, v, mask))
    for name, a, b in zip("qkvm", grads, expected, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=name)


def test_attention_dropout_on_cpu_is_unbiased():
    # Averaged over many masks, dropped attention converges to the undropped output (dropout is unbiased).
    q, k, v, mask = _qkv(batch=1, heads=2, rows=4, cols=5, dim=4)
    with torch.no_grad():
        exact = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        torch.manual_seed(11)
        draws = torch.stack([SDPAKernel().attend(q, k, v, mask, 0.5) for _ in range(4000)])
    assert not torch.allclose(draws[0], exact)  # dropout did happen
    spread = draws.std(0) / math.sqrt(draws.size(0))
    assert torch.all((draws.mean(0) - exact).abs() < 5 * spread + 1e-6)


def test_a_dropout_model_trains_reproducibly_from_a_seed():
    model = tiny_model(dropout=0.1, attention_dropout=0.1, activation_dropout=0.1).train()
    input_ids, positions = random_batch(2, 12, 4)
    losses = []
    for _ in range(2):
        torch.manual_seed(5)
        losses.append(torch.stack([model(input_ids, positions, 4).square().mean() for _ in range(3)]))
    torch.testing.assert_close(losses[0], losses[1], atol=0, rtol=0)
    assert len(set(losses[0].tolist())) == 3  # each forward drew new masks
