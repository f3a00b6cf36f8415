"""FlexAttention kernel (`--attn-impl flex`): no [B, nh, T, S] bias or mask is ever materialized.

The relative bias is a score_mod that looks up the bucket of (key position - query position) in the
distance table and adds the table's weight for that bucket and head; the two-stream visibility rules and
padding are a mask_mod turned into a block mask once per forward. Attention dropout does not exist in
FlexAttention: the model config refuses flex with attention_dropout > 0.

It runs fused on CUDA (through torch.compile, with or without --compile). On CPU it always runs the same
score and mask functions through PyTorch's reference implementation of the flex_attention operator, which
materializes the scores: correct (the tests compare it with SDPA, gradients included) but not fast. PyTorch
2.13 has no FlexAttention backward on CPU, and its fused CPU inference kernel measured 2.7x slower than
SDPA (BENCHMARKS.md, "Attention implementations"), besides a compile for every new shape.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch._higher_order_ops.flex_attention import flex_attention as flex_attention_op
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from .layout import AttentionLayout, bucket_lut

# The options torch.nn.attention.flex_attention passes to the operator for a call that needs gradients.
_REFERENCE_OPTIONS = {
    "BACKEND": "AUTO",
    "PRESCALE_QK": False,
    "ROWS_GUARANTEED_SAFE": False,
    "BLOCKS_ARE_CONTIGUOUS": False,
    "WRITE_DQ": True,
    "OUTPUT_LOGSUMEXP": True,
    "OUTPUT_MAX": False,
}


@dataclass(frozen=True)
class FlexPrepared:
    """What one forward's layers share: the bias lookup and the block mask for rows first_row.."""

    weight: Tensor  # [nb, nh] bias table (gradients flow into it through the score_mod)
    layout: AttentionLayout
    lut: Tensor  # [2M - 1] bucket of every (key - query) distance
    first_row: int
    block_mask: BlockMask


class FlexKernel:
    def prepare(self, table: nn.Embedding, layout: AttentionLayout) -> FlexPrepared:
        # Call the module, not its weight, so ZeRO-3 gathers the table and hooks see it.
        weight = table(torch.arange(table.num_embeddings, device=table.weight.device))  # [nb, nh]
        lut = bucket_lut(layout.max_positions, layout.num_buckets, layout.max_distance, weight.device)
        return FlexPrepared(weight, layout, lut, 0, _block_mask(layout, 0, weight.device))

    def rows_from(self, prepared: FlexPrepared, start: int) -> FlexPrepared:
        block_mask = _block_mask(prepared.layout, start, prepared.weight.device)
        return FlexPrepared(prepared.weight, prepared.layout, prepared.lut, start, block_mask)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, prepared: FlexPrepared, dropout_p: float) -> Tensor:
        if dropout_p > 0:
            raise ValueError("attn_impl 'flex' has no attention dropout: set attention_dropout to 0")
        bias = _bias_score(prepared)
        if q.device.type == "cpu":
            return _reference_attend(q, k, v, bias, prepared)
        attend = flex_attention if torch.compiler.is_compiling() else _compiled_flex_attention()
        return attend(q, k, v, score_mod=lambda s, b, h, qi, kv: bias(s, b, h, qi, kv, prepared.weight),
                      block_mask=prepared.block_mask)  # fmt: skip


def _bias_score(prepared: FlexPrepared) -> Callable[..., Tensor]:
    """score_mod with the bias table as an explicit argument: (score, b, h, q, kv, weight) -> score + bias."""
    layout, lut, first_row = prepared.layout, prepared.lut, prepared.first_row
    offset = layout.max_positions - 1  # lut index of distance 0
    if layout.key_positions is None:  # positions 0..T-1: the distance is the index difference

        def sequential(score, b, h, q, kv, weight):
            return score + weight[lut[kv - (q + first_row) + offset], h]

        return sequential
    keys, rows = layout.key_positions, layout.query_positions

    def permuted(score, b, h, q, kv, weight):
        return score + weight[lut[keys[b, kv] - rows[b, q + first_row] + offset], h]

    return permuted


def _block_mask(layout: AttentionLayout, first_row: int, device: torch.device) -> BlockMask:
    """Allowed (True) pairs for query rows first_row..: the two-stream rules, then padding [B, T', S]."""
    static = layout.static_blocked(device)  # [T, S] or None
    padding = layout.padding  # [B, T] or None

    def allowed(b, h, q, kv):
        row = q + first_row
        ok = kv >= 0
        if static is not None:
            ok = ok & ~static[row, kv]
        if padding is not None:  # padded keys are blocked for real queries only (see block_padding)
            ok = ok & ~(padding[b, kv] & ~padding[b, row])
        return ok

    batch = None if padding is None else padding.size(0)
    return create_block_mask(
        allowed, batch, None, layout.num_rows - first_row, layout.num_keys, device=device
    )


@functools.cache
def _compiled_flex_attention() -> Callable[..., Tensor]:
    # Outside a compiled model flex_attention runs unfused; compiled alone it is one fused kernel.
    return torch.compile(flex_attention, dynamic=False)


@torch.compiler.disable  # the operator's reference implementation, never traced (CPU only)
def _reference_attend(
    q: Tensor, k: Tensor, v: Tensor, bias: Callable[..., Tensor], prepared: FlexPrepared
) -> Tensor:
    options: dict[str, Any] = dict(_REFERENCE_OPTIONS)
    scale = q.size(-1) ** -0.5
    out, _, _ = flex_attention_op(
        q, k, v, bias, prepared.block_mask.as_tuple(), scale, options, (prepared.weight,), ()
    )
    return out
