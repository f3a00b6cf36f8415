"""Per-row MPNet permutation: counter-based hashing, a NumPy implementation and the Cython dispatch.

Randomness is counter-based so that both implementations give identical results and a row depends
only on its seed: the draw for (row seed, stream, position) is a splitmix64 output,
``mix64(mix64(seed + (stream + 1) * GAMMA) + (position + 1) * GAMMA)``. Sorting by iid 64-bit keys
(ties broken by position) is a uniform random permutation, so no sequential RNG state is needed and
the NumPy path is vectorised over the whole batch while the Cython path sorts row by row.

Layout of one row's order (indices into the row, [L]):
``[other protected (ascending) | non-predicted words, in word order | predicted (k) | fillers (ascending)]``
The last ``p = k + fillers`` slots are the predicted tail: ``k`` predicted tokens in query order, then
the filler tokens (the row's last pads; specials only in degenerate rows) that pad the tail. Order
inside the non-predicted part does not matter to the model (it attends to it bidirectionally); only
which tokens are predicted, and in which order, does.
"""

from __future__ import annotations

import warnings

import numpy as np

try:
    from mpnet_dist.data import _permutation as _extension
except ImportError:  # not built: the NumPy path gives identical results, only slower
    _extension = None

HAS_EXTENSION = _extension is not None

_GAMMA = 0x9E3779B97F4A7C15
GAMMA = np.uint64(_GAMMA)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)

# Independent random streams of one row; the Cython file uses the same numbers.
STREAM_WORD = 0  # word order
STREAM_TAIL = 1  # token order inside the predicted tail
STREAM_CORRUPT = 2  # mask / random / keep choice
STREAM_REPLACE = 3  # random replacement id

_warned_fallback = False


def mix64(z: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser on a uint64 array (wrapping arithmetic)."""
    z = (z ^ (z >> np.uint64(30))) * _MIX1
    z = (z ^ (z >> np.uint64(27))) * _MIX2
    return z ^ (z >> np.uint64(31))


def hash_positions(seeds: np.ndarray, stream: int, positions: np.ndarray) -> np.ndarray:
    """Draws one uint64 per (row seed, stream, position).

    seeds: [B] uint64; positions: [B, N] int64 (0-based row positions). Returns [B, N] uint64.
    """
    offset = np.uint64(((stream + 1) * _GAMMA) & 0xFFFFFFFFFFFFFFFF)  # wrapped in Python: no overflow warning
    base = mix64(seeds + offset)  # [B]
    counters = (positions.astype(np.uint64) + np.uint64(1)) * GAMMA
    return mix64(base[:, None] + counters)


def permute_rows_numpy(
    protected: np.ndarray,
    filler: np.ndarray,
    starts: np.ndarray,
    seeds: np.ndarray,
    n_pred: np.ndarray,
) -> np.ndarray:
    """Returns the permuted order [B, L] int64 (see the module docstring for the layout).

    protected, filler, starts: [B, L] bool (a run after a protected token always starts a word);
    seeds: [B] uint64; n_pred: [B] int64, in [0, predictable count of the row].
    """
    batch, length = protected.shape
    pos = np.broadcast_to(np.arange(length, dtype=np.int64), (batch, length))
    starts = starts.copy()
    starts[:, 0] = True
    starts[:, 1:] |= protected[:, :-1]
    # Every token takes the key of its word, so sorting by (key, position) keeps words contiguous.
    word_start = np.maximum.accumulate(np.where(starts, pos, 0), axis=1)  # [B, L]
    word_key = hash_positions(seeds, STREAM_WORD, word_start)  # [B, L]
    by_word = np.lexsort((pos, word_key, protected), axis=-1)  # predictable tokens first
    rank = np.empty_like(by_word)
    np.put_along_axis(rank, by_word, pos, axis=1)
    n_predictable = length - protected.sum(axis=1)
    predicted = ~protected & (rank >= (n_predictable - n_pred)[:, None])

    tail_key = hash_positions(seeds, STREAM_TAIL, pos)
    segment = np.where(protected, np.where(filler, 3, 0), np.where(predicted, 2, 1)).astype(np.int8)
    sub_key = np.where(segment == 1, word_key, np.where(segment == 2, tail_key, pos.astype(np.uint64)))
    return np.lexsort((pos, sub_key, segment), axis=-1).astype(np.int64, copy=False)


def _warn_fallback_once() -> None:
    global _warned_fallback
    if not _warned_fallback:
        _warned_fallback = True
        warnings.warn(
            "mpnet_dist.data._permutation is not built; using the NumPy batch builder (same results, "
            "slower). Build it with `python setup.py build_ext --inplace` or `pip install -e .`.",
            RuntimeWarning,
            stacklevel=3,
        )


def permute_rows(
    protected: np.ndarray,
    filler: np.ndarray,
    starts: np.ndarray,
    seeds: np.ndarray,
    n_pred: np.ndarray,
    use_cython: bool | None = None,
) -> np.ndarray:
    """Dispatches to the Cython extension (default when built) or the NumPy implementation."""
    if use_cython is None:
        use_cython = HAS_EXTENSION
        if not use_cython:
            _warn_fallback_once()
    elif use_cython and not HAS_EXTENSION:
        raise ImportError(
            "use_cython=True but mpnet_dist.data._permutation is not built; "
            "run `python setup.py build_ext --inplace` or `pip install -e .`"
        )
    if use_cython:
        return _extension.permute_rows(
            np.ascontiguousarray(protected).view(np.uint8),
            np.ascontiguousarray(filler).view(np.uint8),
            np.ascontiguousarray(starts).view(np.uint8),
            np.ascontiguousarray(seeds, dtype=np.uint64),
            np.ascontiguousarray(n_pred, dtype=np.int64),
        )
    return permute_rows_numpy(protected, filler, starts, seeds, n_pred)
