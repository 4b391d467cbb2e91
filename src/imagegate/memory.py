"""The C allocator's settings for a process that moves multi-megabyte bodies.

glibc serves allocations above a threshold (128 KB, rising as such blocks are freed) with
their own mmap, and hands the top of its heap back to the kernel when more than 128 KB is free.
A gateway relaying 4 MB base64 images allocates and frees several such buffers per request,
so each one cost fresh pages from the kernel: measured, a 1024x1024 image relayed at
concurrency 1 took 13 ms instead of 6.3 ms (docs/benchmarks.md). Keeping buffers up to 16 MB in
the heap, and trimming it only past 256 MB free, makes them reusable.

Decoded images are the exception: Pillow allocates pixels in blocks of up to 16 MB, just under
that threshold, so a 40 MP reference image left 160 MB in the heap of the worker thread that
decoded it, kept there (a thread's heap is trimmed only past the 256 MB). `map_large_images`
makes Pillow's blocks larger, so a big image's blocks are mapped apart and unmapped when freed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

from PIL import _imaging  # Image.core: the C module holding the allocator settings

logger = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 16 * 1024 * 1024
TRIM_THRESHOLD = 256 * 1024 * 1024
# Above glibc's largest mmap threshold (32 MB on 64-bit; 16 MB once tuned above).
PIXEL_BLOCK_BYTES = 64 * 1024 * 1024


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


def map_large_images() -> None:
    """Pillow allocates an image's pixels in blocks of up to PIXEL_BLOCK_BYTES: an image over
    the mmap threshold (16 MB, 4 MP, when tuned; at most 32 MB otherwise) then gets blocks
    mapped apart, handed back to the kernel when the image is freed, whichever thread decoded
    it. Smaller images stay in the heap, where their memory is reused."""
    _imaging.set_block_size(PIXEL_BLOCK_BYTES)
