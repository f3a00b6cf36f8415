"""MPNet batch builder: permutation, choice of predicted tokens and 80/10/10 corruption.

A pure function of (tokens, word starts, per-row seeds, spec). Randomness is counter-based
(splitmix64 of row seed, stream and position, see ``permutation.py``), so a row's result depends only
on its seed, its content and the batch length L, and the Cython and NumPy paths are identical.

Prediction count per row (p = max(1, round(pred_prob * L)) is the batch-wide tail length):
- a full row (no padding) predicts exactly ``min(p, n)`` of its n predictable tokens;
- a right-padded row predicts ``k = max(1, rint(pred_prob * n))`` of its own tokens, raised to
  ``p - n_pad`` if it has too few pads to fill the tail, and capped at ``min(p, n)``.
The ``p - k`` unused tail slots hold the row's last pads (target -100, both copies pad_id,
padding_mask True). A degenerate row with fewer than ``p - n_pad`` predictable tokens fills the rest
with its last special tokens: target -100, copies equal to the special token.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from mpnet_dist.data.permutation import STREAM_CORRUPT, STREAM_REPLACE, hash_positions, permute_rows

IGNORE_INDEX = -100
_UNIT = 1 << 53  # corruption draws are the top 53 bits of a hash, compared with integer thresholds


@dataclass(frozen=True)
class MaskingSpec:
    mask_id: int
    pad_id: int
    special_ids: tuple[int, ...]  # never predicted, never drawn as random replacements
    vocab_size: int  # len(tokenizer); replacements come from [0, vocab_size) minus specials
    pred_prob: float = 0.15
    rand_prob: float = 0.10  # of predicted tokens, replaced by a random token
    keep_prob: float = 0.10  # of predicted tokens, kept; the rest become mask_id
    whole_word: bool = True

    def __post_init__(self) -> None:
        if not 0.0 < self.pred_prob <= 1.0:
            raise ValueError(f"pred_prob must be in (0, 1], got {self.pred_prob}")
        if self.rand_prob < 0 or self.keep_prob < 0 or self.rand_prob + self.keep_prob > 1.0:
            raise ValueError(f"need rand_prob, keep_prob >= 0 and rand_prob + keep_prob <= 1, got {self}")
        if replacement_ids(self.vocab_size, self.excluded_ids).size == 0 and self.rand_prob > 0:
            raise ValueError(
                f"vocab_size={self.vocab_size} leaves no non-special id to draw replacements from"
            )

    @property
    def excluded_ids(self) -> tuple[int, ...]:
        """Ids that are never predicted nor drawn as replacements: specials, pad and mask."""
        return tuple(sorted({*self.special_ids, self.pad_id, self.mask_id}))


@lru_cache(maxsize=16)
def replacement_ids(vocab_size: int, excluded: tuple[int, ...]) -> np.ndarray:
    """Ids random replacements are drawn from: [0, vocab_size) minus ``excluded`` (read-only)."""
    ids = np.setdiff1d(np.arange(vocab_size, dtype=np.int64), np.asarray(excluded, dtype=np.int64))
    ids.flags.writeable = False
    return ids


def count_predictions(length: int, pred_prob: float) -> int:
    """p, the batch-wide number of predicted slots: round(pred_prob * L), at least 1, at most L."""
    return min(length, max(1, round(pred_prob * length)))


def choose_prediction_counts(
    protected: np.ndarray, is_pad: np.ndarray, p: int, pred_prob: float
) -> np.ndarray:
    """k per row [B] int64 (see the module docstring). protected, is_pad: [B, L] bool."""
    n = protected.shape[1] - protected.sum(axis=1)  # [B] predictable tokens
    n_pad = is_pad.sum(axis=1)
    wanted = np.where(n > 0, np.maximum(np.rint(pred_prob * n).astype(np.int64), 1), 0)
    return np.minimum(np.maximum(wanted, p - n_pad), np.minimum(p, n)).astype(np.int64)


def choose_fillers(protected: np.ndarray, is_pad: np.ndarray, n_fill: np.ndarray) -> np.ndarray:
    """[B, L] bool: the ``n_fill`` protected tokens per row that pad the predicted tail.

    The row's last pads first, then (degenerate rows only) its last other protected tokens.
    """
    other = protected & ~is_pad
    pads_from_end = np.cumsum(is_pad[:, ::-1], axis=1)[:, ::-1]  # 1 on the last pad
    others_from_end = np.cumsum(other[:, ::-1], axis=1)[:, ::-1]
    n_pad = is_pad.sum(axis=1)
    return (is_pad & (pads_from_end <= n_fill[:, None])) | (
        other & (others_from_end <= (n_fill - n_pad)[:, None])
    )


def corrupt_predictions(
    tail_tokens: np.ndarray,
    tail_positions: np.ndarray,
    predicted: np.ndarray,
    seeds: np.ndarray,
    spec: MaskingSpec,
) -> np.ndarray:
    """80/10/10 corruption of the predicted tail, drawn once per token. All inputs/outputs [B, p]."""
    draw = hash_positions(seeds, STREAM_CORRUPT, tail_positions) >> np.uint64(11)  # uniform in [0, 2^53)
    mask_below = np.uint64(round((1.0 - spec.rand_prob - spec.keep_prob) * _UNIT))
    rand_below = np.uint64(round((1.0 - spec.keep_prob) * _UNIT))
    corrupted = np.where(draw < mask_below, np.int64(spec.mask_id), tail_tokens)
    choices = replacement_ids(spec.vocab_size, spec.excluded_ids)
    use_random = (draw >= mask_below) & (draw < rand_below)
    if choices.size and use_random.any():
        # Modulo bias is vocab_size / 2^64: negligible.
        pick = hash_positions(seeds, STREAM_REPLACE, tail_positions) % np.uint64(choices.size)
        corrupted = np.where(use_random, choices[pick.astype(np.int64)], corrupted)
    return np.where(predicted, corrupted, tail_tokens)


def _as_word_starts(word_starts: np.ndarray | None, shape: tuple[int, int]) -> np.ndarray:
    if word_starts is None:
        return np.ones(shape, dtype=bool)  # every token is a word: token-level permutation
    starts = np.asarray(word_starts, dtype=bool)
    if starts.shape != shape:
        raise ValueError(f"word_starts shape {starts.shape} != tokens shape {shape}")
    return starts


def make_mpnet_batch(
    tokens: np.ndarray,
    word_starts: np.ndarray | None,
    seeds: np.ndarray,
    spec: MaskingSpec,
    use_cython: bool | None = None,
) -> dict[str, torch.Tensor]:
    """Builds one MPNet batch from [B, L] token rows (packed blocks or right-padded documents).

    word_starts: [B, L] bool or None (token-level); seeds: [B] one seed per row.
    Returns input_ids, positions [B, L+2p]; targets [B, p] (-100 = no prediction);
    padding_mask [B, L+2p] (True = pad) only when some token is pad_id.
    """
    tokens = np.ascontiguousarray(tokens, dtype=np.int64)
    if tokens.ndim != 2 or tokens.shape[1] == 0:
        raise ValueError(f"tokens must be [B, L] with L > 0, got shape {tokens.shape}")
    batch, length = tokens.shape
    seeds = np.asarray(seeds)
    if seeds.shape != (batch,):
        raise ValueError(f"seeds shape {seeds.shape} != ({batch},)")
    seeds = seeds.astype(np.uint64)  # int64 seeds wrap to the same 64 bits
    starts = _as_word_starts(word_starts if spec.whole_word else None, tokens.shape)

    p = count_predictions(length, spec.pred_prob)
    is_pad = tokens == spec.pad_id  # [B, L]
    protected = np.isin(tokens, spec.excluded_ids)
    n_pred = choose_prediction_counts(protected, is_pad, p, spec.pred_prob)  # [B]
    filler = choose_fillers(protected, is_pad, p - n_pred)
    order = permute_rows(protected, filler, starts, seeds, n_pred, use_cython=use_cython)  # [B, L]

    permuted = np.take_along_axis(tokens, order, axis=1)  # [B, L]
    tail_positions = order[:, length - p :]  # [B, p]
    tail_tokens = permuted[:, length - p :]
    predicted = np.arange(p) < n_pred[:, None]  # [B, p]: fillers sit after the k predictions
    corrupted = corrupt_predictions(tail_tokens, tail_positions, predicted, seeds, spec)

    input_ids = np.concatenate([permuted, corrupted, corrupted], axis=1)  # [B, L+2p]
    out = {
        "input_ids": torch.from_numpy(input_ids),
        "positions": torch.from_numpy(np.concatenate([order, tail_positions, tail_positions], axis=1)),
        "targets": torch.from_numpy(np.where(predicted, tail_tokens, IGNORE_INDEX)),
    }
    if is_pad.any():
        out["padding_mask"] = torch.from_numpy(input_ids == spec.pad_id)
    return out
