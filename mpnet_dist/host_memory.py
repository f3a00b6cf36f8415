"""Host memory for CPU training: keep freed memory in the process instead of handing it back to the kernel.

glibc serves blocks above its mmap threshold with fresh mmaps and unmaps them when freed, so every step's
large tensors (logits, their gradient, the embedding gradients: tens of MB each) come back as new pages the
kernel has to fault in and zero. Measured at 4 x 256, L=128, B=16 on one thread: up to 69,000 page faults and
200 ms of system time per step (12% of it), none with the settings below (BENCHMARKS.md, "Host memory").
The process keeps its peak footprint, which a training loop reaches on its first step anyway.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

logger = logging.getLogger("mpnet_dist")

_M_TRIM_THRESHOLD = -1  # <malloc.h>: free memory above this at the heap top goes back to the kernel
_M_MMAP_THRESHOLD = -3  # <malloc.h>: blocks this large get their own mmap
_MMAP_THRESHOLD = 2**30 - 1  # 1 GiB: above any one tensor of a step (glibc 2.36 accepts it)
_TRIM_THRESHOLD = 2**31 - 1


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds; False (and nothing changed) where the C library is not glibc."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    done = (
        mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD) == 1 and mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD) == 1
    )
    logger.debug("host allocator: glibc mallopt thresholds %s", "raised" if done else "unchanged")
    return done
