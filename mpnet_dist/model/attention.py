"""Relative-position self-attention for MPNet: buckets, two-stream masks and attention kernels.

A kernel turns (bucket indices, bias table, blocked pairs) into whatever it needs once per forward
(`prepare`) and then attends once per layer (`attend`). SDPA and eager share a materialized float
mask; a FlexAttention kernel can instead keep the buckets and build a score_mod and a block mask.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import MPNetConfig


def relative_position_bucket(relative_position: Tensor, num_buckets: int, max_distance: int) -> Tensor:
    """T5-style bidirectional buckets of (key - query) distances, as fairseq MPNet and HF compute them."""
    half = num_buckets // 2
    n = -relative_position
    bucket = (n < 0).long() * half  # keys after the query go to the upper half
    n = n.abs()
    max_exact = half // 2
    # clamp only keeps log() finite for n = 0; those entries take the exact branch below
    log_ratio = torch.log(n.clamp(min=1).float() / max_exact) / math.log(max_distance / max_exact)
    large = max_exact + (log_ratio * (half - max_exact)).long()
    large = large.clamp(max=half - 1)
    return bucket + torch.where(n < max_exact, n, large)


@functools.lru_cache(maxsize=32)
def _cached_two_stream_mask(seq_len: int, pred_size: int, device: torch.device) -> Tensor:
    return build_two_stream_mask(seq_len, pred_size, device)


def two_stream_mask(seq_len: int, pred_size: int, device: torch.device) -> Tensor:
    """Cached `build_two_stream_mask`; the result is shared, never modify it in place."""
    if torch.compiler.is_compiling():
        return build_two_stream_mask(seq_len, pred_size, device)
    return _cached_two_stream_mask(seq_len, pred_size, device)


def build_two_stream_mask(seq_len: int, pred_size: int, device: torch.device) -> Tensor:
    """Blocked (True) query/key pairs of both streams: [L+2p, L+p].

    Rows: content stream (L permuted tokens, then the first mask copy), then the query stream.
    Columns: the content stream, i.e. [non-predicted (L-p) | predicted (p) | mask copy (p)].
    """
    L, p = seq_len, pred_size
    n = L - p
    ones = torch.ones(p, p, dtype=torch.bool, device=device)
    mask = torch.zeros(L + 2 * p, L + p, dtype=torch.bool, device=device)
    mask[:n, n:L] = True  # non-predicted rows never see a predicted token
    mask[n:L, n:L] = ones.triu(1)  # predicted row i sees predicted j <= i
    mask[n:L, L:] = ones.tril(0)  # ... and mask slots j > i
    mask[L : L + p, n:L] = True  # mask-slot rows never see a predicted token
    mask[L + p :, n:L] = ones.triu(0)  # query row i sees predicted j < i
    mask[L + p :, L:] = ones.tril(-1)  # ... and mask slots j >= i
    return mask


def block_padding(query_pad: Tensor, key_pad: Tensor, blocked: Tensor | None = None) -> Tensor:
    """Block padded keys for real queries: [B, T, S].

    Padded queries may see padded keys: every row is structurally allowed its own slot (a query row
    its mask copy), so no row ends up fully blocked. An all -inf row is NaN in softmax, and the NaN
    would reach the weights through backward even when that row's loss is ignored.
    """
    pad_pairs = key_pad[:, None, :] & ~query_pad[:, :, None]  # [B, T, S]
    return pad_pairs if blocked is None else pad_pairs | blocked


@functools.lru_cache(maxsize=32)
def _cached_sequential_buckets(
    seq_len: int, num_buckets: int, max_distance: int, device: torch.device
) -> Tensor:
    index = torch.arange(seq_len, device=device)
    return relative_position_bucket(index[None, :] - index[:, None], num_buckets, max_distance)[None]


def sequential_buckets(seq_len: int, num_buckets: int, max_distance: int, device: torch.device) -> Tensor:
    """Buckets for positions 0..L-1 (what HF MPNet always uses): [1, L, L]."""
    if torch.compiler.is_compiling():
        return _cached_sequential_buckets.__wrapped__(seq_len, num_buckets, max_distance, device)
    return _cached_sequential_buckets(seq_len, num_buckets, max_distance, device)


class AttentionKernel(Protocol):
    def prepare(self, table: nn.Embedding, buckets: Tensor, blocked: Tensor | None) -> Any:
        """Once per forward: buckets [B|1, T, S] long, blocked [B|1, T, S] bool or None."""

    def attend(self, q: Tensor, k: Tensor, v: Tensor, prepared: Any, dropout_p: float) -> Tensor:
        """Once per layer: q [B, nh, T, d], k/v [B, nh, S, d] -> [B, nh, T, d]."""


def build_float_mask(
    table: nn.Embedding, buckets: Tensor, blocked: Tensor | None, row_multiple: int = 1
) -> Tensor:
    """Relative bias with -inf where blocked: [B|1, nh, T, S], in the dtype attention will run in.

    The result is contiguous except that rows may start at multiples of `row_multiple` elements:
    SDPA's memory-efficient CUDA kernel copies an unaligned mask on every call, i.e. every layer.
    """
    # Call the module, not F.embedding on its weight, so ZeRO-3 gathers the table and hooks see it.
    bias = table(buckets).permute(0, 3, 1, 2)  # [B|1, nh, T, S], strided as [B|1, T, S, nh]
    if blocked is not None:
        bias = bias.masked_fill(blocked[:, None], float("-inf"))
    device = bias.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else bias.dtype
    *lead, size = bias.shape
    buffer = bias.new_empty(*lead, size + (-size % row_multiple), dtype=dtype)
    mask = buffer[..., :size]
    mask.copy_(bias)  # one pass: head-major layout, dtype cast and alignment together
    return mask


class SDPAKernel:
    def prepare(self, table: nn.Embedding, buckets: Tensor, blocked: Tensor | None) -> Tensor:
        return build_float_mask(table, buckets, blocked, row_multiple=16)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, prepared: Tensor, dropout_p: float) -> Tensor:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=prepared.to(q.dtype), dropout_p=dropout_p)


class EagerKernel:
    """Plain reference path: scores + bias, softmax in fp32."""

    def prepare(self, table: nn.Embedding, buckets: Tensor, blocked: Tensor | None) -> Tensor:
        return build_float_mask(table, buckets, blocked)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, prepared: Tensor, dropout_p: float) -> Tensor:
        scores = torch.matmul(q, k.transpose(-1, -2)) * q.size(-1) ** -0.5 + prepared  # [B, nh, T, S]
        probs = torch.softmax(scores.float(), dim=-1).to(v.dtype)
        if dropout_p > 0:
            probs = F.dropout(probs, p=dropout_p)
        return torch.matmul(probs, v)


ATTENTION_KERNELS: dict[str, AttentionKernel] = {"sdpa": SDPAKernel(), "eager": EagerKernel()}


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

    def forward(self, x: Tensor, num_kv: int, prepared: Any, kernel: AttentionKernel) -> Tensor:
        """x [B, T, H]; keys/values are x[:, :num_kv]."""
        batch, rows, dim = x.shape
        if num_kv == rows:
            q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
        else:
            q = F.linear(x, self.in_proj_weight[:dim], self.in_proj_bias[:dim])  # [B, T, H]
            kv = F.linear(x[:, :num_kv], self.in_proj_weight[dim:], self.in_proj_bias[dim:])
            k, v = kv.chunk(2, dim=-1)  # [B, S, H] each
        q = q.view(batch, rows, self.num_heads, self.head_dim).transpose(1, 2)  # [B, nh, T, d]
        k = k.view(batch, num_kv, self.num_heads, self.head_dim).transpose(1, 2)  # [B, nh, S, d]
        v = v.view(batch, num_kv, self.num_heads, self.head_dim).transpose(1, 2)
        dropout_p = self.dropout if self.training else 0.0
        out = kernel.attend(q, k, v, prepared, dropout_p)  # [B, nh, T, d]
        return self.out_proj(out.transpose(1, 2).reshape(batch, rows, dim))
