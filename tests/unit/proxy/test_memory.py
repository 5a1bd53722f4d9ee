"""glibc allocator settings: what tune_malloc keeps resident, and trim_heap giving it back."""

from __future__ import annotations

import subprocess
import sys

_FREED_BUT_RESIDENT = """
from ztunnel_py.proxy.memory import trim_heap, tune_malloc

def rss_anon_kib():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1])

assert tune_malloc()
blocks = [bytes(4096) for _ in range(4096)]  # 16 MiB of malloc'd blocks (above pymalloc's 512 B)
keep = bytes(4096)  # allocated last, above them, so the heap's top cannot shrink
del blocks
freed = rss_anon_kib()
assert trim_heap()
print(freed - rss_anon_kib())
"""


def test_trim_heap_returns_what_tune_malloc_keeps_resident() -> None:
    out = subprocess.run(
        [sys.executable, "-c", _FREED_BUT_RESIDENT], capture_output=True, text=True, check=True
    )
    released_kib = int(out.stdout.split()[-1])
    assert released_kib > 12 * 1024, f"trim_heap released only {released_kib} KiB of 16 MiB"
