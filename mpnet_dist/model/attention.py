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
def _cached_bucket_lut(
    max_positions: int, num_buckets: int, max_distance: int, device: torch.device
) -> Tensor:
    distance = torch.arange(1 - max_positions, max_positions, device=device)
    return relative_position_bucket(distance, num_buckets, max_distance)


def relative_buckets(
    key_positions: Tensor, query_positions: Tensor, max_positions: int, num_buckets: int, max_distance: int
) -> Tensor:
    """[B, S] and [B, T] positions in [0, max_positions) -> [B, T, S] buckets of (key - query).

    The same values as relative_position_bucket on the [B, T, S] distances, read from a cached table of
    every possible distance: one subtraction and one gather instead of ~15 elementwise passes.
    """
    lut_args = (max_positions, num_buckets, max_distance, key_positions.device)
    lut = (
        _cached_bucket_lut.__wrapped__(*lut_args)
        if torch.compiler.is_compiling()
        else _cached_bucket_lut(*lut_args)
    )
    relative = key_positions[:, None, :] - query_positions[:, :, None]  # [B, T, S]
    return lut[relative + (max_positions - 1)]


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
