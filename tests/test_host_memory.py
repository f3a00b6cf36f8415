"""keep_freed_memory: after it, a training step's large tensors stop costing fresh pages (page faults)."""

from __future__ import annotations

import platform
import subprocess
import sys
import textwrap

import pytest

# A child process (mallopt is process-wide): allocate and free 40 MB tensors, count minor page faults.
CHILD = textwrap.dedent("""
    import resource, sys, torch
    from mpnet_dist.host_memory import keep_freed_memory
    if sys.argv[1] == "kept":
        assert keep_freed_memory()
    def churn():
        for _ in range(20):
            x = torch.ones(10_000_000)  # 40 MB, above glibc's default mmap threshold
            del x
    churn()  # warm-up: the heap grows once
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    churn()
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
""")


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_freed_memory_is_reused_without_page_faults():
    faults = {}
    for mode in ("default", "kept"):
        done = subprocess.run([sys.executable, "-c", CHILD, mode], capture_output=True, text=True, check=True)
        faults[mode] = int(done.stdout.strip().splitlines()[-1])
    assert faults["default"] > 20 * 9000  # every 40 MB tensor faults its ~9,800 pages in again
    assert faults["kept"] < 1000, faults
