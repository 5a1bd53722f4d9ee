"""glibc allocator settings for a proxy process.

Python allocates every buffer above 512 bytes with malloc, and glibc serves blocks above its
mmap threshold (128 KiB, raised dynamically, lowered again by realloc-shrunk blocks) with a
fresh mmap/munmap pair. Socket reads of 64-256 KiB then cost two or three extra syscalls and
page faults each. Raising the threshold once at start keeps such buffers on the heap.

The price: glibc then keeps up to twice that threshold of freed heap instead of returning it,
so a large transient allocation stays resident. ``trim_heap`` returns it after one is known to
have happened (libbpf's parse of the kernel's BTF, ~11 MiB, when the kernel splice loads).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
DEFAULT_MMAP_THRESHOLD_BYTES = 8 * 1024 * 1024


@functools.cache
def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    return None if name is None else ctypes.CDLL(name)


def tune_malloc(mmap_threshold: int = DEFAULT_MMAP_THRESHOLD_BYTES) -> bool:
    """Raise glibc's mmap and trim thresholds; ``False`` where there is no glibc ``mallopt``."""
    libc = _libc()
    mallopt = None if libc is None else getattr(libc, "mallopt", None)
    if mallopt is None:
        return False
    ok = mallopt(M_MMAP_THRESHOLD, mmap_threshold) == 1
    return bool(mallopt(M_TRIM_THRESHOLD, 2 * mmap_threshold) == 1 and ok)


def trim_heap() -> bool:
    """Give the heap's free pages back to the kernel (glibc ``malloc_trim(0)``, which also
    releases free pages below the top); ``False`` where there is no glibc."""
    libc = _libc()
    malloc_trim = None if libc is None else getattr(libc, "malloc_trim", None)
    if malloc_trim is None:
        return False
    malloc_trim(0)
    return True
