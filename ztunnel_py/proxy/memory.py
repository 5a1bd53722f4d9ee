"""glibc allocator settings for a proxy process.

Python allocates every buffer above 512 bytes with malloc, and glibc serves blocks above its
mmap threshold (128 KiB, raised dynamically, lowered again by realloc-shrunk blocks) with a
fresh mmap/munmap pair. Socket reads of 64-256 KiB then cost two or three extra syscalls and
page faults each. Raising the threshold once at start keeps such buffers on the heap.
"""

from __future__ import annotations

import ctypes
import ctypes.util

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
DEFAULT_MMAP_THRESHOLD_BYTES = 8 * 1024 * 1024


def tune_malloc(mmap_threshold: int = DEFAULT_MMAP_THRESHOLD_BYTES) -> bool:
    """Raise glibc's mmap and trim thresholds; ``False`` where there is no glibc ``mallopt``."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    libc = ctypes.CDLL(name)
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is None:
        return False
    ok = mallopt(M_MMAP_THRESHOLD, mmap_threshold) == 1
    return bool(mallopt(M_TRIM_THRESHOLD, 2 * mmap_threshold) == 1 and ok)
