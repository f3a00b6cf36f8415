"""FlexAttention kernel (model/flex.py) against SDPA: outputs and gradients, two-stream and encode."""

from __future__ import annotations

import pytest
import torch

from mpnet_dist.config import ConfigError, parse_config
from tests.helpers import PAD, random_batch, tiny_model

FLEX_TOL = 1e-5  # fp32; both compute softmax(qk/sqrt(d) + bias) v, in different orders


def _outputs_and_grads(model, impl: str) -> list[torch.Tensor]:
    """Two-stream (packed and padded) and encode outputs, then the gradients of a loss over all of them."""
    model.config.attn_impl = impl
    model.zero_grad()
    input_ids, positions = random_batch(3, 14, 4)
    padding_mask = torch.zeros_like(input_ids, dtype=torch.bool)
    padding_mask[2, :3] = True
    encode_ids = input_ids[:, :14].clone()
    encode_ids[1, 10:] = PAD
    outputs = (
        model(input_ids, positions, 4),
        model(input_ids, positions, 4, padding_mask),
        model.mlm_logits(encode_ids, (encode_ids != PAD).long()),
    )
    sum(out.square().mean() for out in outputs).backward()
    return [out.detach() for out in outputs] + [p.grad.clone() for p in model.parameters()]


def test_flex_matches_sdpa_with_gradients_on_cpu():
    model = tiny_model().train()  # dropout 0: the kernels must agree exactly up to rounding
    sdpa = _outputs_and_grads(model, "sdpa")
    flex = _outputs_and_grads(model, "flex")
    assert model.sentence_encoder.relative_attention_bias.weight.grad.abs().sum() > 0
    for a, b in zip(sdpa, flex, strict=True):
        torch.testing.assert_close(b, a, atol=FLEX_TOL, rtol=0)


def test_flex_inference_matches_sdpa():
    model = tiny_model()
    input_ids, positions = random_batch(2, 14, 4)
    with torch.no_grad():
        model.config.attn_impl = "sdpa"
        expected = model(input_ids, positions, 4)
        model.config.attn_impl = "flex"
        got = model(input_ids, positions, 4)
    torch.testing.assert_close(got, expected, atol=FLEX_TOL, rtol=0)


def test_flex_with_attention_dropout_is_refused_naming_the_flag():
    with pytest.raises(ConfigError, match="--attention-dropout 0"):
        parse_config(["--attn-impl", "flex"])
    assert parse_config(["--attn-impl", "flex", "--attention-dropout", "0"]).attn_impl == "flex"
    with pytest.raises(ValueError, match="attention_dropout"):
        tiny_model(attn_impl="flex", attention_dropout=0.1)
