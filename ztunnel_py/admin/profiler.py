"""Profiling the running daemon without stopping it: CPU samples and heap allocations.

``sample_stacks`` runs on a helper thread and reads the event-loop thread's current Python
stack every ``interval_s`` (``sys._current_frames``), for ``seconds``; the loop keeps serving
traffic meanwhile (the sampler only holds the GIL for the time of one stack walk). Native code
(uvloop's C loop, OpenSSL) shows as the Python frame that called it; an idle loop shows as the
frames that run it (``run_forever``), which is what "not busy" looks like here.

``heap_top`` uses ``tracemalloc``; it is started on first use (allocations made before are not
seen) and costs memory and time while on, so ``stop_heap`` turns it off again.
"""

from __future__ import annotations

import sys
import threading
import time
import tracemalloc
from types import FrameType
from typing import Any

from ztunnel_py.admin.stacks import Stack, frame_name

MAX_DEPTH = 128
HEAP_FRAMES = 8


class ProfilerBusy(RuntimeError):
    pass


_busy = threading.Lock()


def _stack(frame: FrameType | None) -> Stack:
    names: list[str] = []
    while frame is not None and len(names) < MAX_DEPTH:
        code = frame.f_code
        names.append(frame_name(code.co_qualname, code.co_filename, code.co_firstlineno))
        frame = frame.f_back
    names.reverse()
    return tuple(names)


def sample_stacks(thread_id: int, seconds: float, interval_s: float = 0.005) -> dict[Stack, int]:
    """Samples of ``thread_id``'s stack (call from another thread). One profile at a time."""
    if not _busy.acquire(blocking=False):
        raise ProfilerBusy("a CPU profile is already being taken; try again when it is done")
    try:
        samples: dict[Stack, int] = {}
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            frame = sys._current_frames().get(thread_id)
            if frame is None:
                break  # the thread is gone
            stack = _stack(frame)
            del frame
            samples[stack] = samples.get(stack, 0) + 1
            time.sleep(interval_s)
        return samples
    finally:
        _busy.release()


def heap_top(limit: int) -> dict[str, Any]:
    """The ``limit`` biggest allocation sites still alive (starts tracemalloc when off)."""
    started = False
    if not tracemalloc.is_tracing():
        tracemalloc.start(HEAP_FRAMES)
        started = True
    snapshot = tracemalloc.take_snapshot()
    stats = snapshot.statistics("traceback")
    current, peak = tracemalloc.get_traced_memory()
    return {
        "tracing": True,
        "startedNow": started,
        "note": "only allocations made since tracing started are counted",
        "tracedBytes": current,
        "peakTracedBytes": peak,
        "top": [
            {
                "sizeBytes": s.size,
                "count": s.count,
                "traceback": [f"{f.filename}:{f.lineno}" for f in reversed(s.traceback)],
            }
            for s in stats[:limit]
        ],
    }


def stop_heap() -> bool:
    was = tracemalloc.is_tracing()
    tracemalloc.stop()
    return was
