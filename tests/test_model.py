"""Tests for mpnet_dist.model: config, init, two-stream masks and forward, attention paths."""

from __future__ import annotations

import json

import pytest
import torch

from mpnet_dist.model import MPNetConfig, MPNetForPretraining
from mpnet_dist.model.attention import build_float_mask
from mpnet_dist.model.layout import two_stream_mask
from tests.helpers import PAD, TOKENIZER_VOCAB, random_batch, tiny_config, tiny_model


def two_stream_row(tokens: list[int], positions: list[int], masked: list[int], p: int):
    """One row: tokens/positions in permuted order (last p predicted), masked = corrupted ids of those p."""
    ids = tokens + masked + masked
    pos = positions + positions[-p:] + positions[-p:]
    return torch.tensor(ids), torch.tensor(pos)


def allowed_by_rules(row: int, col: int, seq_len: int, p: int) -> bool:
    """DESIGN.md's two-stream rules for one (row, key column) pair; rows L+p.. are the query stream."""
    n = seq_len - p

    def kind(index: int) -> tuple[str, int]:
        if index < n:
            return "token", index
        if index < seq_len:
            return "pred", index - n
        if index < seq_len + p:
            return "mask", index - seq_len
        return "query", index - seq_len - p

    row_kind, i = kind(row)
    col_kind, j = kind(col)
    if col_kind == "token":
        return True
    if row_kind == "query":
        return j < i if col_kind == "pred" else j >= i
    if row_kind == "pred":
        return j <= i if col_kind == "pred" else j > i
    return col_kind == "mask"  # non-predicted and mask-slot rows: masks yes, predicted tokens no


# ---------------------------------------------------------------- config and init


def test_config_round_trips_through_json():
    config = tiny_config(activation_fn="silu", normalize_before=True, attn_impl="eager")
    restored = MPNetConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert restored == config


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("activation_fn", "tanh"),
        ("attn_impl", "flash"),
        ("encoder_attention_heads", 5),
        ("dropout", 1.0),
        ("padding_idx", 128),
        ("relative_attention_num_buckets", 3),
        ("relative_attention_max_distance", 2),
        ("encoder_layers", True),
        ("vocab_size", "128"),
    ],
)
def test_config_rejects_bad_values_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        tiny_config(**{field: value})


def test_config_from_dict_rejects_unknown_keys():
    with pytest.raises(ValueError, match="encoder_embed_size"):
        MPNetConfig.from_dict({"encoder_embed_size": 32})


def test_init_is_bert_style_with_tied_head():
    torch.manual_seed(0)
    config = tiny_config(vocab_size=512, max_positions=30)
    model = MPNetForPretraining(config)
    enc = model.sentence_encoder
    assert model.lm_head.weight is enc.embed_tokens.weight
    assert sum(p is enc.embed_tokens.weight for p in model.parameters()) == 1
    assert enc.embed_positions.weight.shape[0] == config.max_positions + config.padding_idx + 1
    for table in (enc.embed_tokens, enc.embed_positions):
        assert torch.all(table.weight[PAD] == 0)
        rest = torch.cat([table.weight[:PAD], table.weight[PAD + 1 :]])
        assert abs(rest.std().item() - 0.02) < 0.002
    for name, param in model.named_parameters():
        if name.endswith("bias") and "layer_norm" not in name:
            assert torch.all(param == 0), name
        if "layer_norm" in name and name.endswith("weight"):
            assert torch.all(param == 1), name
    attn = enc.layers[0].self_attn
    assert abs(attn.in_proj_weight.std().item() - 0.02) < 0.003
    assert abs(enc.layers[0].fc1.weight.std().item() - 0.02) < 0.003


# ---------------------------------------------------------------- two-stream masks


@pytest.mark.parametrize(("seq_len", "p"), [(10, 3), (7, 1), (5, 5), (6, 0)])
def test_two_stream_mask_matches_rules(seq_len, p):
    total = seq_len + 2 * p
    expected = torch.tensor(
        [[not allowed_by_rules(r, c, seq_len, p) for c in range(seq_len + p)] for r in range(total)],
        dtype=torch.bool,
    ).reshape(total, seq_len + p)
    assert torch.equal(two_stream_mask(seq_len, p, torch.device("cpu")), expected)


@pytest.mark.parametrize("attn_impl", ["sdpa", "eager"])
def test_no_label_leak(attn_impl):
    model = tiny_model(attn_impl=attn_impl)
    seq_len, p = 9, 4
    n = seq_len - p
    input_ids, positions = random_batch(2, seq_len, p)
    captured = {}

    def leaf_embeddings(module, args, output):
        captured["emb"] = output.detach().requires_grad_(True)
        return captured["emb"]

    handle = model.sentence_encoder.embed_tokens.register_forward_hook(leaf_embeddings)
    logits = model(input_ids, positions, p)
    handle.remove()
    for i in range(p):
        (grad,) = torch.autograd.grad(logits[:, i].sum(), captured["emb"], retain_graph=True)
        reach = grad.abs().sum(-1)  # [B, L+2p]
        blind = [n + j for j in range(i, p)]  # own token and later predicted tokens
        blind += [seq_len + p + k for k in range(p) if k != i]  # the query stream is never a key
        assert torch.all(reach[:, blind] == 0), f"query {i} sees a blocked slot"
        seen = list(range(n)) + [n + j for j in range(i)]
        seen += [seq_len + j for j in range(i, p)] + [seq_len + p + i]
        assert torch.all(reach[:, seen] > 0), f"query {i} misses an allowed slot"


# ---------------------------------------------------------------- two-stream forward


def test_lm_head_runs_only_on_query_stream():
    model = tiny_model()
    input_ids, positions = random_batch(3, 12, 4)
    shapes = []
    model.lm_head.register_forward_hook(lambda m, args, out: shapes.append(tuple(args[0].shape)))
    logits = model(input_ids, positions, 4)
    assert logits.shape == (3, 4, 128)
    assert shapes == [(3, 4, 32)]


def test_relative_bias_built_once_per_forward():
    model = tiny_model()
    calls = []
    model.sentence_encoder.relative_attention_bias.register_forward_hook(lambda *a: calls.append(1))
    input_ids, positions = random_batch(2, 12, 4)
    model(input_ids, positions, 4)
    model.encode(input_ids)
    assert len(calls) == 2


def test_non_predicted_order_is_irrelevant():
    # Positions, not slot order, carry the sequence: shuffling the non-predicted slots (with their
    # positions) must not change anything, which fails if positions come from the permuted order.
    model = tiny_model()
    seq_len, p = 12, 4
    input_ids, positions = random_batch(2, seq_len, p)
    shuffle = torch.cat([torch.randperm(seq_len - p), torch.arange(seq_len - p, seq_len + 2 * p)])
    reference = model(input_ids, positions, p)
    shuffled = model(input_ids[:, shuffle], positions[:, shuffle], p)
    torch.testing.assert_close(shuffled, reference, atol=1e-5, rtol=0)


def test_padding_does_not_change_two_stream_outputs():
    model = tiny_model()
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(5, TOKENIZER_VOCAB, (10,), generator=gen).tolist()
    positions = torch.randperm(10, generator=gen).tolist()
    masked = [4, 4, tokens[-1]]
    ids, pos = two_stream_row(tokens, positions, masked, p=3)
    alone = model(ids[None], pos[None], 3)[0]  # [3, V]

    # Padded: 3 pads among the non-predicted slots, 2 pads inside the predicted tail (p = 5).
    tail_tokens = [tokens[7], PAD, tokens[8], tokens[9], PAD]
    tail_pos = [positions[7], 0, positions[8], positions[9], 0]
    tail_masked = [masked[0], PAD, masked[1], masked[2], PAD]
    padded_tokens = [PAD, *tokens[:4], PAD, PAD, *tokens[4:7], *tail_tokens]
    padded_pos = [0, *positions[:4], 0, 0, *positions[4:7], *tail_pos]
    ids_pad, pos_pad = two_stream_row(padded_tokens, padded_pos, tail_masked, p=5)
    other_ids, other_pos = random_batch(1, 15, 5, seed=3)
    batch_ids = torch.stack([ids_pad, other_ids[0]])
    batch_pos = torch.stack([pos_pad, other_pos[0]])
    padding_mask = torch.zeros_like(batch_ids, dtype=torch.bool)
    padding_mask[0] = batch_ids[0] == PAD

    logits = model(batch_ids, batch_pos, 5, padding_mask)
    torch.testing.assert_close(logits[0, [0, 2, 3]], alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(logits[1], model(other_ids, other_pos, 5)[0], atol=1e-5, rtol=0)


def test_fully_padded_row_stays_finite():
    model = tiny_model()
    model.train()
    input_ids, positions = random_batch(2, 8, 2)
    input_ids[1] = PAD
    padding_mask = input_ids == PAD
    logits = model(input_ids, positions, 2, padding_mask)
    logits[0].sum().backward()
    assert torch.isfinite(logits).all()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_pred_size_must_fit():
    model = tiny_model()
    input_ids, positions = random_batch(1, 6, 2)
    with pytest.raises(ValueError, match="pred_size"):
        model(input_ids, positions, 4)


# ---------------------------------------------------------------- encode


def test_padding_does_not_change_encode():
    model = tiny_model()
    ids = torch.randint(5, TOKENIZER_VOCAB, (2, 9), generator=torch.Generator().manual_seed(2))
    alone = model.encode(ids)
    padded = torch.cat([ids, torch.full((2, 5), PAD)], dim=1)
    padded[1, 6:] = PAD  # second row is shorter
    mask = (padded != PAD).long()
    out = model.encode(padded, mask)
    torch.testing.assert_close(out[0, :9], alone[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(out[1, :6], model.encode(ids[1:, :6])[0], atol=1e-5, rtol=0)


# ---------------------------------------------------------------- attention paths, checkpointing, precision


def test_sdpa_matches_eager():
    model = tiny_model()
    input_ids, positions = random_batch(3, 14, 4)
    padding_mask = torch.zeros_like(input_ids, dtype=torch.bool)
    padding_mask[2, :3] = True
    encode_ids = input_ids[:, :14].clone()
    encode_ids[1, 10:] = PAD
    results = {}
    for impl in ("sdpa", "eager"):
        model.config.attn_impl = impl
        model.zero_grad()
        outputs = (
            model(input_ids, positions, 4),
            model(input_ids, positions, 4, padding_mask),
            model.mlm_logits(encode_ids, (encode_ids != PAD).long()),
        )
        sum(out.square().mean() for out in outputs).backward()
        grads = [p.grad.clone() for p in model.parameters()]
        results[impl] = [out.detach() for out in outputs] + grads
    assert model.sentence_encoder.relative_attention_bias.weight.grad.abs().sum() > 0
    for sdpa, eager in zip(results["sdpa"], results["eager"], strict=True):
        torch.testing.assert_close(sdpa, eager, atol=1e-5, rtol=0)


def test_sdpa_mask_rows_are_aligned():
    # SDPA's memory-efficient CUDA kernel re-pads (copies) an unaligned mask on every layer.
    table = torch.nn.Embedding(32, 4)
    buckets = torch.randint(0, 32, (2, 13, 9))
    mask = build_float_mask(table, buckets, torch.zeros(1, 13, 9, dtype=torch.bool), row_multiple=16)
    assert mask.shape == (2, 4, 13, 9)
    assert mask.stride(-1) == 1 and all(stride % 16 == 0 for stride in mask.stride()[:-1])
    torch.testing.assert_close(mask, table(buckets).permute(0, 3, 1, 2), atol=0, rtol=0)


def _grads_after_step(model: MPNetForPretraining, input_ids, positions, p) -> dict[str, torch.Tensor]:
    model.zero_grad()
    torch.manual_seed(123)  # same dropout masks in both runs
    logits = model(input_ids, positions, p)
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), input_ids[:, -p:].flatten()).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def test_gradient_checkpointing_gives_same_gradients(monkeypatch):
    model = tiny_model(dropout=0.1, attention_dropout=0.1, activation_dropout=0.1).train()
    input_ids, positions = random_batch(2, 12, 4)
    plain = _grads_after_step(model, input_ids, positions, 4)
    layer = model.sentence_encoder.layers[0]
    calls = []
    forward = layer.forward
    # hooks do not fire on recompute, so count calls of forward itself
    monkeypatch.setattr(layer, "forward", lambda *a: calls.append(1) or forward(*a))
    model.config.gradient_checkpointing = True
    checkpointed = _grads_after_step(model, input_ids, positions, 4)
    assert len(calls) == 2  # forward plus recompute: checkpointing really ran
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("attn_impl", ["sdpa", "eager"])
def test_bf16_autocast_on_cpu(attn_impl):
    model = tiny_model(attn_impl=attn_impl)
    input_ids, positions = random_batch(2, 12, 4)
    reference = model(input_ids, positions, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(input_ids, positions, 4, input_ids == PAD)
        encoded = model.encode(input_ids[:, :12])
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()
    assert torch.isfinite(encoded).all()
    scale = reference.abs().max().item()
    assert (logits.float() - reference).abs().max().item() < 0.05 * scale
    logits.float().sum().backward()


@pytest.mark.parametrize("activation_fn", ["relu", "silu", "gelu_tanh"])
def test_pre_ln_and_other_activations_run(activation_fn):
    model = tiny_model(normalize_before=True, activation_fn=activation_fn)
    assert model.sentence_encoder.final_layer_norm is not None
    input_ids, positions = random_batch(2, 10, 3)
    assert torch.isfinite(model(input_ids, positions, 3)).all()
    assert torch.isfinite(model.mlm_logits(input_ids)).all()
