"""The C allocator's settings for a process that moves multi-megabyte bodies.

glibc serves allocations above a threshold (128 KB, rising as such blocks are freed) with
their own mmap, and hands the top of its heap back to the kernel when more than 128 KB is free.
A gateway relaying 4 MB base64 images allocates and frees several such buffers per request,
so each one cost fresh pages from the kernel: measured, a 1024x1024 image relayed at
concurrency 1 took 13 ms instead of 6.3 ms (docs/benchmarks.md). Keeping buffers up to 16 MB in
the heap, and trimming it only past 256 MB free, makes them reusable.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

logger = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 16 * 1024 * 1024
TRIM_THRESHOLD = 256 * 1024 * 1024


def tune_allocator() -> bool:
    """Apply the settings above with glibc's mallopt; False where there is no glibc (macOS,
    musl) or it refused, and the process runs with the allocator's defaults."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    done = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1)
    done = bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1) and done
    if not done:
        logger.info("the C allocator did not take imagegate's settings; using its defaults")
    return done
