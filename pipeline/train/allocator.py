"""Keep freed memory in the process instead of handing it back to the kernel (glibc malloc).

By default glibc serves blocks above a moving threshold with fresh mmaps and trims the heap top
whenever 128 KiB or more is free, so every training step gives its activations back to the kernel
and faults them in again, page by page. Measured on the ViT-Ti/16 realistic bench (2 cores):
~48,000 page faults/s and 0.11 core-s/s of kernel time in the trainer, about 5% of the machine. With
blocks up to 32 MiB (glibc's largest threshold) served from the heap and the heap never trimmed:
~4,000 faults/s and 0.01 core-s/s, for ~2% more peak RSS (what a step frees is reused by the next, but
the heap is never trimmed). `train.keep_freed_memory: false` turns this off. Other C libraries (musl,
macOS) are left as they are.
"""
from __future__ import annotations

import ctypes

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
MMAP_THRESHOLD_MAX = 32 << 20  # glibc refuses larger values on 64-bit
NEVER_TRIM = 2**31 - 1  # mallopt takes an int


def keep_freed_memory() -> bool:
    """True if glibc's malloc now keeps freed memory; False where there is no glibc to tune."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX)) and bool(mallopt(M_TRIM_THRESHOLD, NEVER_TRIM))
