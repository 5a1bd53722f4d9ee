"""What a long-lived HBONE connection keeps per stream once the stream is over: nothing that
grows with the number of streams it has carried."""

from __future__ import annotations

import gc
import tracemalloc

from ztunnel_py.hbone.connection import CLOSED_STREAMS_REMEMBERED
from ztunnel_py.testing.hbone_pairs import open_accepted, pair, xfer

KiB = 1024
# Only what the HBONE/h2 code allocates counts: threads that earlier tests in the same session
# left running (loggers, background loops) allocate too, and tracemalloc traces every thread.
_OWN_CODE = [
    tracemalloc.Filter(True, pattern)
    for pattern in ("*/ztunnel_py/hbone/*", "*/h2/*", "*/hpack/*", "*/hyperframe/*", __file__)
]


def _traced() -> int:
    return sum(
        s.size for s in tracemalloc.take_snapshot().filter_traces(_OWN_CODE).statistics("filename")
    )


def test_finished_streams_leave_no_trace_on_either_side() -> None:
    client, server = pair()

    def one_stream() -> None:
        sid = open_accepted(client, server)
        client.send(sid, b"ping", end=True)
        xfer(client, server)
        server.send(sid, b"pong", end=True)
        xfer(client, server)
        assert not client.has_stream(sid) and not server.has_stream(sid)

    tracemalloc.start()
    try:
        for _ in range(400):  # warm up: per-connection tables reach their steady size
            one_stream()
        gc.collect()
        baseline = _traced()
        for _ in range(2000):
            one_stream()
        gc.collect()
        grown = _traced() - baseline
    finally:
        tracemalloc.stop()
    assert grown < 64 * KiB, f"{grown} bytes kept after 2000 finished streams"
    for side in (client, server):
        assert len(side._h2._closed_streams) <= CLOSED_STREAMS_REMEMBERED
        assert len(side._h2.streams) <= side.settings.max_concurrent_streams
