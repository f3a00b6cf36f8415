"""Throughput of make_mpnet_batch, Cython extension vs NumPy fallback, in one process.

    OMP_NUM_THREADS=1 python -m benchmarks.batch_builder [--min-time 0.5] [--repeats 5]   # from the repo root

Reports input tokens/s (B * L per call, padding included for the padded case) as the median over
repeats; each repeat runs calls until --min-time seconds have passed. Inputs are synthetic
(MPNet special-id layout, 30527-token vocabulary, ~1.4 tokens per word).
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import time

import numpy as np

from benchmarks.machine import cpu_model
from mpnet_dist.data import permutation
from mpnet_dist.data.batch import MaskingSpec, make_mpnet_batch

VOCAB = 30527
SPEC = MaskingSpec(mask_id=VOCAB - 1, pad_id=1, special_ids=(0, 1, 2, 3, VOCAB - 1), vocab_size=VOCAB)
CASES = [  # (label, B, L, whole words, padded)
    ("packed, whole-word", 16, 512, True, False),
    ("packed, token-level", 16, 512, False, False),
    ("padded docs, whole-word", 16, 512, True, True),
    ("packed, whole-word", 64, 128, True, False),
]


def build_inputs(batch: int, length: int, padded: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    tokens = rng.integers(4, VOCAB - 1, size=(batch, length))
    tokens[rng.random((batch, length)) < 0.005] = 2  # </s> between packed documents
    tokens[:, 0] = 0
    if padded:
        for row, n in enumerate(rng.integers(length // 8, length + 1, size=batch)):
            tokens[row, n:] = 1
    starts = (rng.random((batch, length)) < 0.7) | (tokens < 4)
    return tokens, starts, np.arange(batch, dtype=np.uint64)


def measure(args: tuple, use_cython: bool, min_time: float, repeats: int) -> float:
    """Median seconds per call."""
    make_mpnet_batch(*args, use_cython=use_cython)  # warm-up
    per_call = []
    for _ in range(repeats):
        calls, start = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - start) < min_time:
            make_mpnet_batch(*args, use_cython=use_cython)
            calls += 1
        per_call.append(elapsed / calls)
    return float(np.median(per_call))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--min-time", type=float, default=0.5, help="seconds per repeat")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    print(f"command: {shlex.join([sys.executable, *sys.argv])}")
    print(
        f"machine: {os.cpu_count()} CPUs, {cpu_model()}; OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}"
    )
    print(
        f"numpy {np.__version__}, python {platform.python_version()}, extension built: {permutation.HAS_EXTENSION}"
    )
    print()
    print("| case | B | L | NumPy tok/s | Cython tok/s | speed-up |")
    print("|---|---:|---:|---:|---:|---:|")
    for label, batch, length, whole_word, padded in CASES:
        tokens, starts, seeds = build_inputs(batch, length, padded)
        call_args = (tokens, starts if whole_word else None, seeds, SPEC)
        numpy_rate = batch * length / measure(call_args, False, args.min_time, args.repeats)
        if permutation.HAS_EXTENSION:
            cython_rate = batch * length / measure(call_args, True, args.min_time, args.repeats)
            cython_cell, ratio = f"{cython_rate:,.0f}", f"{cython_rate / numpy_rate:.2f}x"
        else:
            cython_cell, ratio = "not built", "-"
        print(f"| {label} | {batch} | {length} | {numpy_rate:,.0f} | {cython_cell} | {ratio} |")


if __name__ == "__main__":
    main()
