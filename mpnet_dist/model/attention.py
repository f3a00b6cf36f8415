"""Relative-position self-attention for MPNet and its attention kernels.

A kernel turns an `AttentionLayout` (positions, two-stream rules, padding) and the bias table into whatever
it needs once per forward (`prepare`), narrows that to the last rows when a layer only needs some query rows
(`rows_from`), and attends once per layer (`attend`). SDPA and eager share a materialized float mask; the
FlexAttention kernel (model/flex.py) keeps positions and builds a score_mod and a block mask.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import MPNetConfig
from .dropout import draws_own_masks, dropout
from .flex import FlexKernel
from .layout import AttentionLayout


class AttentionKernel(Protocol):
    def prepare(self, table: nn.Embedding, layout: AttentionLayout) -> Any:
        """Once per forward: the bias table [nb, nh] as a module (call it, for ZeRO-3 and hooks)."""

    def rows_from(self, prepared: Any, start: int) -> Any:
        """`prepared` for query rows start.. only (keys unchanged); once per forward."""

    def attend(self, q: Tensor, k: Tensor, v: Tensor, prepared: Any, dropout_p: float) -> Tensor:
        """Once per layer: q [B, nh, T, d], k/v [B, nh, S, d] -> [B, nh, T, d]."""


def build_float_mask(
    table: nn.Embedding, buckets: Tensor, blocked: Tensor | None, row_multiple: int = 1
) -> Tensor:
    """Relative bias with -inf where blocked: [B|1, nh, T, S], in the dtype attention will run in.

    The result is contiguous except that rows may start at multiples of `row_multiple` elements:
    SDPA's memory-efficient CUDA kernel copies an unaligned mask on every call, i.e. every layer.
    """
    num_buckets = table.num_embeddings
    # Call the module, not F.embedding on its weight, so ZeRO-3 gathers the table and hooks see it.
    weight = table(torch.arange(num_buckets, device=buckets.device))  # [nb, nh]
    index = buckets if blocked is None else torch.where(blocked, num_buckets, buckets)  # [B|1, T, S]
    device = weight.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
    return _GatherBias.apply(weight, index, dtype, row_multiple)


class _GatherBias(torch.autograd.Function):
    """mask[b, h, t, s] = weight[index[b, t, s], h], or -inf where index == nb: [B|1, nh, T, S].

    One gather writes the head-major, row-aligned mask in its final dtype; the autograd path it replaces
    (embedding, masked_fill, permuted cast-copy) made three passes forward and, backward, an
    embedding_dense_backward over every (b, t, s) that dominated the bias cost on CPU.
    """

    @staticmethod
    def forward(ctx: Any, weight: Tensor, index: Tensor, dtype: torch.dtype, row_multiple: int) -> Tensor:
        num_buckets, heads = weight.shape
        batch, rows, cols = index.shape
        pad = -cols % row_multiple
        if pad:  # padded columns read the -inf slot; they are sliced off below
            index = F.pad(index, (0, pad), value=num_buckets)
        source = torch.cat([weight.t(), weight.new_full((heads, 1), float("-inf"))], dim=1).to(dtype)
        source = source[None, :, None, :].expand(batch, heads, rows, num_buckets + 1)
        mask = torch.gather(source, 3, index[:, None].expand(batch, heads, rows, cols + pad))
        ctx.save_for_backward(index[..., :cols])
        ctx.num_buckets, ctx.weight_dtype = num_buckets, weight.dtype
        return mask[..., :cols]

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None, None]:
        (index,) = ctx.saved_tensors  # [B|1, T, S]
        batch, heads, rows, cols = grad.shape
        # Accumulate in fp32 whatever the mask dtype, as the embedding backward did; blocked pairs land
        # in the extra -inf slot, which is dropped. On CUDA scatter_add_ uses atomics (not bitwise
        # deterministic unless torch.use_deterministic_algorithms is on).
        sums = grad.new_zeros(batch, heads, rows, ctx.num_buckets + 1, dtype=torch.float32)
        sums.scatter_add_(3, index[:, None].expand(batch, heads, rows, cols), grad.float())
        weight_grad = sums.sum(dim=(0, 2))[:, : ctx.num_buckets].t()  # [nb, nh]
        return weight_grad.to(ctx.weight_dtype), None, None, None


class SDPAKernel:
    def prepare(self, table: nn.Embedding, layout: AttentionLayout) -> Tensor:
        device = table.weight.device
        return build_float_mask(table, layout.buckets(device), layout.blocked(device), row_multiple=16)

    def rows_from(self, prepared: Tensor, start: int) -> Tensor:
        return prepared[:, :, start:]  # a view; row starts stay aligned

    def attend(self, q: Tensor, k: Tensor, v: Tensor, prepared: Tensor, dropout_p: float) -> Tensor:
        if dropout_p > 0 and draws_own_masks(q):
            # With a float mask and dropout, torch's CPU SDPA takes its math path: the same products and
            # softmax, plus fully-masked-row checks no layout needs (no row is ever fully blocked), and
            # bernoulli_ masks 3x slower to draw than model/dropout.py's.
            return math_attention(q, k, v, prepared, dropout_p)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=prepared.to(q.dtype), dropout_p=dropout_p)


def math_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, dropout_p: float) -> Tensor:
    """dropout(softmax(q k^T / sqrt(d) + mask)) v, softmax in fp32: q [B, nh, T, d], k/v [B, nh, S, d].

    The scale and the mask enter the score product itself (baddbmm), one pass over [B, nh, T, S] fewer
    than scaling and adding afterwards.
    """
    batch, heads, rows, dim = q.shape
    cols = k.size(2)
    flat = batch * heads
    bias = mask.to(q.dtype).expand(batch, heads, rows, cols).reshape(flat, rows, cols)
    keys = k.reshape(flat, cols, dim).transpose(1, 2)
    scores = torch.baddbmm(bias, q.reshape(flat, rows, dim), keys, alpha=dim**-0.5)  # [B*nh, T, S]
    probs = dropout(torch.softmax(scores, dim=-1, dtype=torch.float32).to(v.dtype), dropout_p)
    return torch.bmm(probs, v.reshape(flat, cols, dim)).view(batch, heads, rows, dim)


class EagerKernel:
    """Plain reference path (`math_attention`): scores + bias, softmax in fp32, no fused kernel."""

    def prepare(self, table: nn.Embedding, layout: AttentionLayout) -> Tensor:
        device = table.weight.device
        return build_float_mask(table, layout.buckets(device), layout.blocked(device))

    def rows_from(self, prepared: Tensor, start: int) -> Tensor:
        return prepared[:, :, start:]

    def attend(self, q: Tensor, k: Tensor, v: Tensor, prepared: Tensor, dropout_p: float) -> Tensor:
        return math_attention(q, k, v, prepared, dropout_p)


ATTENTION_KERNELS: dict[str, AttentionKernel] = {
    "sdpa": SDPAKernel(),
    "eager": EagerKernel(),
    "flex": FlexKernel(),
}


def get_kernel(attn_impl: str) -> AttentionKernel:
    try:
        return ATTENTION_KERNELS[attn_impl]
    except KeyError:
        raise ValueError(f"attn_impl must be one of {sorted(ATTENTION_KERNELS)}, got {attn_impl!r}") from None


class RelativeSelfAttention(nn.Module):
    """Multi-head attention whose keys/values may be a prefix of the query rows (the content stream)."""

    def __init__(self, config: MPNetConfig) -> None:
        super().__init__()
        dim = config.encoder_embed_dim
        self.num_heads = config.encoder_attention_heads
        self.head_dim = config.head_dim
        self.dropout = config.attention_dropout
        # Fused q, k, v rows (in that order), split at call time so keys/values skip the query stream.
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * dim))
        self.out_proj = nn.Linear(dim, dim)

    def forward(
        self, x: Tensor, num_kv: int, prepared: Any, kernel: AttentionKernel, first_row: int = 0
    ) -> Tensor:
        """x [B, T, H]; keys/values are x[:, :num_kv]; queries x[:, first_row:] -> [B, T - first_row, H]."""
        batch, _, dim = x.shape
        if num_kv == x.size(1) and first_row == 0:
            q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
        else:
            q = F.linear(x[:, first_row:], self.in_proj_weight[:dim], self.in_proj_bias[:dim])  # [B, T', H]
            kv = F.linear(x[:, :num_kv], self.in_proj_weight[dim:], self.in_proj_bias[dim:])
            k, v = kv.chunk(2, dim=-1)  # [B, S, H] each
        rows = q.size(1)
        q = q.view(batch, rows, self.num_heads, self.head_dim).transpose(1, 2)  # [B, nh, T, d]
        k = k.view(batch, num_kv, self.num_heads, self.head_dim).transpose(1, 2)  # [B, nh, S, d]
        v = v.view(batch, num_kv, self.num_heads, self.head_dim).transpose(1, 2)
        dropout_p = self.dropout if self.training else 0.0
        out = kernel.attend(q, k, v, prepared, dropout_p)  # [B, nh, T, d]
        return self.out_proj(out.transpose(1, 2).reshape(batch, rows, dim))
