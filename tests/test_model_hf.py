"""Tests for mpnet_dist.model.hf: numerical parity with transformers' MPNet, both conversion directions."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import transformers

from mpnet_dist.model import HFExportError, MPNetForPretraining, from_hf, to_hf
from tests.helpers import tiny_config

PAD = 1
TOKENIZER_VOCAB = 100  # token ids stay below this; both models carry a vocab padded to 128
TOLERANCE = 1e-5


def perturb(model: torch.nn.Module, seed: int) -> None:
    """Move every weight off its init so biases, LayerNorms and padding rows all matter."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=gen))


def ours(seed: int = 0, **overrides) -> MPNetForPretraining:
    torch.manual_seed(seed)
    model = MPNetForPretraining(tiny_config(**overrides))
    perturb(model, seed)
    return model.eval()


def hf_model(seed: int = 0, **overrides) -> transformers.MPNetForMaskedLM:
    settings = dict(
        vocab_size=128,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=42,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    settings.update(overrides)
    torch.manual_seed(seed)
    model = transformers.MPNetForMaskedLM(transformers.MPNetConfig(**settings))
    perturb(model, seed)
    return model.eval()


def padded_batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """[3, 20] ids with two right-padded rows, and the HF attention mask (1 = keep)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, TOKENIZER_VOCAB, (3, 20), generator=gen)
    ids[ids == PAD] = 4
    ids[1, 13:] = PAD
    ids[2, 5:] = PAD
    return ids, (ids != PAD).long()


def max_diffs(model: MPNetForPretraining, hf: transformers.MPNetForMaskedLM) -> tuple[float, float]:
    """Max abs differences of hidden states and logits over the real tokens of a padded batch."""
    ids, mask = padded_batch()
    real = mask.bool()
    with torch.no_grad():
        hidden = model.encode(ids, mask)
        logits = model.mlm_logits(ids, mask)
        hf_hidden = hf.mpnet(input_ids=ids, attention_mask=mask).last_hidden_state
        hf_logits = hf(input_ids=ids, attention_mask=mask).logits
    assert logits.shape == hf_logits.shape == (3, 20, 128)
    return (hidden - hf_hidden)[real].abs().max().item(), (logits - hf_logits)[real].abs().max().item()


# ---------------------------------------------------------------- parity


@pytest.mark.parametrize("attn_impl", ["sdpa", "eager"])
def test_ours_to_hf_matches_transformers(attn_impl):
    model = ours(attn_impl=attn_impl)
    hidden_diff, logit_diff = max_diffs(model, to_hf(model))
    assert hidden_diff <= TOLERANCE and logit_diff <= TOLERANCE


@pytest.mark.parametrize("attn_impl", ["sdpa", "eager"])
def test_hf_to_ours_matches_transformers(attn_impl):
    hf = hf_model(layer_norm_eps=1e-12)
    model = from_hf(hf, attn_impl=attn_impl).eval()
    assert model.config.layer_norm_eps == 1e-12
    assert model.config.max_positions == 40 and model.config.vocab_size == 128
    hidden_diff, logit_diff = max_diffs(model, hf)
    assert hidden_diff <= TOLERANCE and logit_diff <= TOLERANCE


def two_stream_through_hf(hf: transformers.MPNetForMaskedLM, input_ids, positions, p: int) -> torch.Tensor:
    """The two-stream forward assembled from HF's own modules, as a self-attention over all L+2p slots
    with the query-stream columns blocked, the bias from the slots' positions, and the masking rules
    written out per element."""
    total = input_ids.size(1)
    seq_len, n = total - 2 * p, total - 3 * p

    def kind(index: int) -> tuple[str, int]:
        bounds = [("token", 0), ("pred", n), ("mask", seq_len), ("query", seq_len + p)]
        name, start = [b for b in bounds if index >= b[1]][-1]
        return name, index - start

    def allowed(row: int, col: int) -> bool:
        (row_kind, i), (col_kind, j) = kind(row), kind(col)
        if col_kind == "query":
            return False
        if col_kind == "token":
            return True
        if row_kind == "query":
            return j < i if col_kind == "pred" else j >= i
        if row_kind == "pred":
            return j <= i if col_kind == "pred" else j > i
        return col_kind == "mask"

    blocked = torch.tensor([[not allowed(r, c) for c in range(total)] for r in range(total)])
    additive = torch.zeros(total, total).masked_fill(blocked, torch.finfo(torch.float32).min)
    x = hf.mpnet.embeddings(input_ids=input_ids, position_ids=positions + PAD + 1)
    # HF's compute_position_bias(position_ids=...) fails for [B, T] ids, so use its parts directly.
    relative = positions[:, None, :] - positions[:, :, None]  # key - query, [B, T, T]
    buckets = hf.mpnet.encoder.relative_position_bucket(relative)
    bias = hf.mpnet.encoder.relative_attention_bias(buckets).permute(0, 3, 1, 2)  # [B, H, T, T]
    for layer in hf.mpnet.encoder.layer:
        x = layer(x, additive[None, None], bias)[0]
    return hf.lm_head(x[:, -p:])


def test_two_stream_forward_matches_hf_modules():
    hf = hf_model(seed=1)
    model = from_hf(hf).eval()
    gen = torch.Generator().manual_seed(5)
    seq_len, p = 16, 5
    tokens = torch.randint(3, TOKENIZER_VOCAB, (2, seq_len), generator=gen)
    perm = torch.stack([torch.randperm(seq_len, generator=gen) + 3 for _ in range(2)])  # not from 0
    masked = torch.randint(3, TOKENIZER_VOCAB, (2, p), generator=gen)
    input_ids = torch.cat([tokens, masked, masked], dim=1)
    positions = torch.cat([perm, perm[:, -p:], perm[:, -p:]], dim=1)
    with torch.no_grad():
        expected = two_stream_through_hf(hf, input_ids, positions, p)
        logits = model(input_ids, positions, p)
    assert (logits - expected).abs().max().item() <= TOLERANCE


# ---------------------------------------------------------------- conversion


def test_round_trip_is_exact_including_padded_vocab(tmp_path):
    model = ours(vocab_size=256)  # e.g. a 200-token tokenizer rounded up to a multiple of 128
    hf = to_hf(model)
    assert hf.lm_head.decoder.weight is hf.mpnet.embeddings.word_embeddings.weight
    assert hf.lm_head.decoder.bias is hf.lm_head.bias
    hf.save_pretrained(tmp_path)
    for back in (from_hf(hf), from_hf(tmp_path)):
        assert back.config == dataclasses.replace(model.config, activation_dropout=0.0)
        assert back.lm_head.weight is back.sentence_encoder.embed_tokens.weight
        expected = model.state_dict()
        got = back.state_dict()
        assert got.keys() == expected.keys()
        for key, value in expected.items():
            assert torch.equal(got[key], value), key


def test_hf_config_carries_our_settings():
    model = ours(layer_norm_eps=1e-6, dropout=0.2, attention_dropout=0.05, max_positions=30)
    cfg = to_hf(model, bos_token_id=0, eos_token_id=2).config
    assert cfg.layer_norm_eps == 1e-6
    assert cfg.max_position_embeddings == 32
    assert cfg.hidden_act == "gelu"
    assert cfg.vocab_size == 128
    assert (cfg.hidden_dropout_prob, cfg.attention_probs_dropout_prob) == (0.2, 0.05)
    assert (cfg.pad_token_id, cfg.bos_token_id, cfg.eos_token_id) == (1, 0, 2)
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.intermediate_size) == (
        32,
        2,
        4,
        64,
    )


def test_to_hf_accepts_a_wrapped_state_dict():
    model = ours()
    wrapped = {"_orig_mod.module." + k: v for k, v in model.state_dict().items()}
    _, logit_diff = max_diffs(model, to_hf(model, state_dict=wrapped))
    assert logit_diff <= TOLERANCE


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("normalize_before", True),
        ("relative_attention_num_buckets", 64),
        ("relative_attention_max_distance", 256),
        ("padding_idx", 0),
        ("activation_fn", "relu"),
        ("activation_fn", "gelu_tanh"),
    ],
)
def test_to_hf_refuses_unrepresentable_settings(field, value):
    model = MPNetForPretraining(tiny_config(**{field: value}))
    with pytest.raises(HFExportError, match=field):
        to_hf(model)


def test_from_hf_mpnet_model_gets_a_fresh_head():
    hf = hf_model(seed=2)
    with pytest.warns(UserWarning, match="freshly initialized"):
        model = from_hf(hf.mpnet).eval()
    ids, mask = padded_batch()
    with torch.no_grad():
        diff = model.encode(ids, mask) - hf.mpnet(input_ids=ids, attention_mask=mask).last_hidden_state
    assert diff[mask.bool()].abs().max().item() <= TOLERANCE
    assert torch.all(model.lm_head.bias == 0)


def test_from_hf_refuses_architecture_overrides():
    with pytest.raises(ValueError, match="vocab_size"):
        from_hf(hf_model(), vocab_size=256)
    model = from_hf(hf_model(), dropout=0.2, gradient_checkpointing=True)
    assert model.config.dropout == 0.2 and model.config.gradient_checkpointing


def test_from_hf_refuses_non_gelu():
    with pytest.raises(ValueError, match="hidden_act"):
        from_hf(hf_model(hidden_act="relu"))
