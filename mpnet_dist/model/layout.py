"""Who attends to whom in one forward, and at what relative distance: buckets, two-stream masks, padding.

`AttentionLayout` is what an attention kernel is prepared from. The SDPA and eager kernels materialize it
(`buckets()`, `blocked()`: [B|1, T, S]); the FlexAttention kernel reads positions and the small two-stream
table inside its score and mask functions instead.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from torch import Tensor


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
    return build_bucket_lut(max_positions, num_buckets, max_distance, device)


def build_bucket_lut(max_positions: int, num_buckets: int, max_distance: int, device: torch.device) -> Tensor:
    """Bucket of every possible (key - query) distance: [2M - 1], index = distance + M - 1."""
    distance = torch.arange(1 - max_positions, max_positions, device=device)
    return relative_position_bucket(distance, num_buckets, max_distance)


def bucket_lut(max_positions: int, num_buckets: int, max_distance: int, device: torch.device) -> Tensor:
    """Cached `build_bucket_lut` (rebuilt while compiling: a traced graph must not capture a cache)."""
    args = (max_positions, num_buckets, max_distance, device)
    return build_bucket_lut(*args) if torch.compiler.is_compiling() else _cached_bucket_lut(*args)


def relative_buckets(
    key_positions: Tensor, query_positions: Tensor, max_positions: int, num_buckets: int, max_distance: int
) -> Tensor:
    """[B, S] and [B, T] positions in [0, max_positions) -> [B, T, S] buckets of (key - query).

    The same values as relative_position_bucket on the [B, T, S] distances, read from a cached table of
    every possible distance: one subtraction and one gather instead of ~15 elementwise passes.
    """
    lut = bucket_lut(max_positions, num_buckets, max_distance, key_positions.device)
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


@dataclass(frozen=True)
class AttentionLayout:
    """One forward's attention geometry: T query rows over the first S of them as keys.

    Positions None mean 0..T-1 in order (HF's encode). Two-stream rows are the content stream
    (S = L + p: permuted tokens, then the first mask copy) followed by the query stream (p rows), which
    measures distances from the positions of the first mask copy's rows.
    """

    num_rows: int  # T
    num_keys: int  # S
    key_positions: Tensor | None  # [B, S] original positions of the keys; None: 0..S-1
    query_positions: Tensor | None  # [B, T] positions each row's distances are measured from; None: 0..T-1
    two_stream: tuple[int, int] | None  # (L, p) when the two-stream visibility rules apply
    padding: Tensor | None  # [B, T] True at padding (the keys' padding is its first S columns)
    max_positions: int
    num_buckets: int
    max_distance: int

    @classmethod
    def for_two_stream(
        cls, positions: Tensor, pred_size: int, padding: Tensor | None, config
    ) -> AttentionLayout:
        """positions [B, L+2p] (0-based, in slot order), padding [B, L+2p] or None."""
        total = positions.size(1)
        seq_len = total - 2 * pred_size
        num_kv = seq_len + pred_size
        content = positions[:, :num_kv]
        rows = torch.cat([content, content[:, seq_len:]], dim=1)  # [B, L+2p]
        return cls(total, num_kv, content, rows, (seq_len, pred_size), padding, *_bucket_args(config))

    @classmethod
    def for_sequence(cls, seq_len: int, padding: Tensor | None, config) -> AttentionLayout:
        return cls(seq_len, seq_len, None, None, None, padding, *_bucket_args(config))

    @property
    def device(self) -> torch.device:
        for tensor in (self.key_positions, self.padding):
            if tensor is not None:
                return tensor.device
        return torch.device("cpu")

    def buckets(self, device: torch.device) -> Tensor:
        """[B|1, T, S] bucket of (key position - query position)."""
        if self.key_positions is None:
            return sequential_buckets(self.num_rows, self.num_buckets, self.max_distance, device)
        return relative_buckets(
            self.key_positions, self.query_positions, self.max_positions, self.num_buckets, self.max_distance
        )

    def static_blocked(self, device: torch.device) -> Tensor | None:
        """[T, S] pairs blocked for every sample (the two-stream rules), or None."""
        if self.two_stream is None:
            return None
        return two_stream_mask(*self.two_stream, device)

    def blocked(self, device: torch.device) -> Tensor | None:
        """[B|1, T, S] blocked pairs (True), or None when every pair is allowed."""
        static = self.static_blocked(device)
        static = None if static is None else static[None]
        if self.padding is None:
            return static
        return block_padding(self.padding, self.padding[:, : self.num_keys], static)


def _bucket_args(config) -> tuple[int, int, int]:
    return config.max_positions, config.relative_attention_num_buckets, config.relative_attention_max_distance
