"""Seeded orders and per-row seeds as pure functions of (seed, position): no RNG state to save."""

import numpy as np

from mpnet_dist.data.permutation import GAMMA, mix64

_M64 = (1 << 64) - 1
_ROUNDS = 4


def _mix_int(x: int) -> int:
    # splitmix64 (golden-ratio step, then the finalizer) on a Python int.
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def mix_key(*parts: int) -> int:
    """A 64-bit key from a tuple of integers (seed, pass, tag ...)."""
    key = 0
    for part in parts:
        key = _mix_int(key ^ (part & _M64))
    return key


def splitmix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 (golden-ratio step, then the batch builder's finalizer `mix64`) on a uint64 array; a bijection."""
    return mix64(np.asarray(x, dtype=np.uint64) + GAMMA)


def row_seeds(seed: int, tag: int, positions: np.ndarray) -> np.ndarray:
    """One uint64 seed per row from the run seed, a stream tag and the row's position in that stream."""
    return splitmix64(np.asarray(positions, dtype=np.uint64) ^ np.uint64(mix_key(seed, tag)))


def permute(index: np.ndarray, n: int, key: int) -> np.ndarray:
    """Map positions in a pass to block indices: a keyed bijection of [0, n).

    A balanced Feistel network on 2h >= log2(n) bits with cycle walking, so a pass order over
    hundreds of millions of blocks costs no memory and any position is computed directly.
    """
    half = max(1, ((n - 1).bit_length() + 1) // 2)
    mask, shift = np.uint64((1 << half) - 1), np.uint64(half)
    keys = [np.uint64(mix_key(key, r)) for r in range(_ROUNDS)]
    x = np.asarray(index, dtype=np.uint64).copy()
    todo = np.ones(x.shape, dtype=bool)
    while todo.any():
        y = x[todo]
        left, right = y >> shift, y & mask
        for k in keys:
            left, right = right, left ^ (splitmix64(right ^ k) & mask)
        x[todo] = (left << shift) | right
        todo = x >= np.uint64(n)  # outside [0, n): walk the cycle until we land inside
    return x.astype(np.int64)
