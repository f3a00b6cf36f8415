# cython: boundscheck=False, wraparound=False, initializedcheck=False, cdivision=True
"""Cython hot loop of the MPNet batch builder: the whole batch's permutation in one call.

Must stay bit-identical to ``permutation.permute_rows_numpy`` (same hash, same streams, same
tie-breaking by position); tests/test_data_batch.py checks it.
"""

import numpy as np

from libc.stdint cimport int64_t, uint8_t, uint64_t
from libc.stdlib cimport free, malloc

cdef uint64_t GAMMA = 0x9E3779B97F4A7C15ULL
# Stream numbers match permutation.STREAM_WORD / STREAM_TAIL.
cdef uint64_t STREAM_WORD = 0
cdef uint64_t STREAM_TAIL = 1


cdef struct KeyedIndex:
    uint64_t key
    int64_t index


cdef inline uint64_t mix64(uint64_t z) noexcept nogil:
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL
    return z ^ (z >> 31)


cdef inline bint keyed_less(KeyedIndex x, KeyedIndex y) noexcept nogil:
    return x.key < y.key or (x.key == y.key and x.index < y.index)


cdef void sort_keyed(KeyedIndex* items, int64_t n, KeyedIndex* scratch, int64_t* counts) noexcept nogil:
    """Sorts by (key, index). Keys are uniform hashes, so bucketing on the top bits then one
    insertion pass is expected linear time (qsort's indirect compares were most of a row's cost).
    ``scratch`` holds n items, ``counts`` 2n + 1 entries."""
    cdef int64_t i, j, bucket, n_buckets = 1
    cdef int bits = 0
    cdef KeyedIndex item
    if n < 2:
        return
    while n_buckets < n:  # n >= 2, so at least one bit and fewer than 2n buckets
        n_buckets <<= 1
        bits += 1
    for i in range(n_buckets + 1):
        counts[i] = 0
    for i in range(n):
        counts[(items[i].key >> (64 - bits)) + 1] += 1
    for i in range(n_buckets):
        counts[i + 1] += counts[i]
    for i in range(n):
        bucket = items[i].key >> (64 - bits)
        scratch[counts[bucket]] = items[i]
        counts[bucket] += 1
    for i in range(n):
        item = scratch[i]
        j = i
        while j > 0 and keyed_less(item, items[j - 1]):
            items[j] = items[j - 1]
            j -= 1
        items[j] = item


cdef int permute_row(
    const uint8_t* protected,
    const uint8_t* filler,
    const uint8_t* starts,
    uint64_t seed,
    int64_t n_pred,
    int64_t length,
    KeyedIndex* keyed,
    KeyedIndex* scratch,
    int64_t* counts,
    int64_t* by_word,
    int64_t* out,
) noexcept nogil:
    """Writes one row's order into ``out``; returns -1 (writing nothing past ``length``) on bad input."""
    cdef uint64_t word_base = mix64(seed + (STREAM_WORD + 1) * GAMMA)
    cdef uint64_t tail_base = mix64(seed + (STREAM_TAIL + 1) * GAMMA)
    cdef int64_t j, i, w, n_words = 0, n = 0, o = 0, g = 0

    # One key per word, keyed at its start position.
    for j in range(length):
        if protected[j]:
            continue
        if filler[j]:
            return -1
        # A run after a protected token always starts a word, whatever ``starts`` says.
        if starts[j] or j == 0 or protected[j - 1]:
            keyed[n_words].key = mix64(word_base + <uint64_t> (j + 1) * GAMMA)
            keyed[n_words].index = j
            n_words += 1
        n += 1
    if n_pred < 0 or n_pred > n:
        return -1
    sort_keyed(keyed, n_words, scratch, counts)

    # Span expansion: a word runs from its start to the next start or protected token.
    for w in range(n_words):
        j = keyed[w].index
        by_word[g] = j
        g += 1
        j += 1
        while j < length and not protected[j] and not starts[j]:
            by_word[g] = j
            g += 1
            j += 1

    for j in range(length):
        if protected[j] and not filler[j]:
            out[o] = j
            o += 1
    for i in range(n - n_pred):
        out[o] = by_word[i]
        o += 1
    # Predicted tail reshuffled at token level.
    for i in range(n_pred):
        j = by_word[n - n_pred + i]
        keyed[i].key = mix64(tail_base + <uint64_t> (j + 1) * GAMMA)
        keyed[i].index = j
    sort_keyed(keyed, n_pred, scratch, counts)
    for i in range(n_pred):
        out[o] = keyed[i].index
        o += 1
    for j in range(length):
        if filler[j]:
            out[o] = j
            o += 1
    return 0


def permute_rows(
    const uint8_t[:, ::1] protected,
    const uint8_t[:, ::1] filler,
    const uint8_t[:, ::1] starts,
    const uint64_t[::1] seeds,
    const int64_t[::1] n_pred,
):
    """Same contract as ``permute_rows_numpy``; boolean inputs are passed as uint8 views."""
    cdef Py_ssize_t batch = protected.shape[0], length = protected.shape[1], b
    if not (filler.shape[0] == starts.shape[0] == seeds.shape[0] == n_pred.shape[0] == batch):
        raise ValueError("permute_rows: batch sizes differ")
    if filler.shape[1] != length or starts.shape[1] != length:
        raise ValueError("permute_rows: row lengths differ")
    order = np.empty((batch, length), dtype=np.int64)
    cdef int64_t[:, ::1] out = order
    if batch == 0 or length == 0:
        return order
    cdef KeyedIndex* keyed = <KeyedIndex*> malloc(length * sizeof(KeyedIndex))
    cdef KeyedIndex* scratch = <KeyedIndex*> malloc(length * sizeof(KeyedIndex))
    cdef int64_t* counts = <int64_t*> malloc((2 * length + 1) * sizeof(int64_t))
    cdef int64_t* by_word = <int64_t*> malloc(length * sizeof(int64_t))
    if keyed == NULL or scratch == NULL or counts == NULL or by_word == NULL:
        free(keyed)
        free(scratch)
        free(counts)
        free(by_word)
        raise MemoryError()
    cdef int status = 0
    with nogil:
        for b in range(batch):
            status = permute_row(
                &protected[b, 0], &filler[b, 0], &starts[b, 0], seeds[b], n_pred[b], length,
                keyed, scratch, counts, by_word, &out[b, 0],
            )
            if status != 0:
                break
    free(keyed)
    free(scratch)
    free(counts)
    free(by_word)
    if status != 0:
        raise ValueError(f"permute_rows: row {b} has a filler that is not protected or n_pred outside [0, n]")
    return order
