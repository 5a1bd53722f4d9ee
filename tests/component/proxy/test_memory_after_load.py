"""After a burst of connections through both proxies, nothing per connection stays behind:
the splices, sides, records and tasks of finished connections are freed, and the traced
memory goes back to where it was (apart from the pool's one pooled HBONE connection)."""

from __future__ import annotations

import asyncio
import collections
import gc
import logging
import tracemalloc

import pytest
from prometheus_client import CollectorRegistry

from ztunnel_py.state.store import ProxyState
from ztunnel_py.telemetry.metrics import ConnectionMetrics
from ztunnel_py.telemetry.sink import ProxyTelemetry
from ztunnel_py.testing.poll import wait_until_async
from ztunnel_py.testing.proxy_harness import Mesh, echo_app, start_mesh

CONNECTIONS = 2000
CONCURRENT = 100
KiB = 1024
PER_CONNECTION_TYPES = frozenset(
    {
        "HboneSplice",
        "TcpSplice",
        "TcpSide",
        "AcceptedSide",
        "ConnectionRecord",
        "_InboundConnection",
        "HboneProtocol",
        "SSLProtocol",
        "_SelectorSocketTransport",
        "Task",
        "StreamWriter",
    }
)


def live_objects() -> collections.Counter[str]:
    gc.collect()
    return collections.Counter(
        name for o in gc.get_objects() if (name := type(o).__name__) in PER_CONNECTION_TYPES
    )


async def one_connection(mesh: Mesh, port: int) -> None:
    reader, writer = await mesh.dial(port)
    writer.write(b"x" * 100)
    assert await reader.readexactly(100) == b"x" * 100
    writer.close()
    await writer.wait_closed()


async def burst(mesh: Mesh, port: int, n: int) -> None:
    for _ in range(0, n, CONCURRENT):
        await asyncio.gather(*(one_connection(mesh, port) for _ in range(CONCURRENT)))
    await wait_until_async(
        lambda: not mesh.outbound.tracker.splices and not mesh.inbound.tracker.splices,
        "every splice to finish",
    )
    await wait_until_async(
        lambda: not mesh.outbound.tracker.tasks and not mesh.inbound.tracker.tasks,
        "every connection task to finish",
    )


@pytest.mark.slow
@pytest.mark.asyncio
async def test_memory_returns_after_a_burst_of_connections() -> None:
    state = ProxyState()
    telemetry = ProxyTelemetry(ConnectionMetrics(CollectorRegistry()), state, network="")
    # One pooled HBONE connection carries every stream, as a busy node's long-lived one does.
    mesh = await start_mesh(telemetry=telemetry, state=state, max_streams_per_connection=10**6)
    try:
        port = await mesh.serve_app(echo_app)
        # pytest's log capture keeps every record (and the fields it references) until the test
        # ends; with the access logger at INFO, as an earlier test may leave it, that is
        # megabytes of the runner's memory, not the proxy's.
        logging.disable(logging.INFO)
        tracemalloc.start()
        try:
            await burst(mesh, port, 4 * CONCURRENT)  # warm up: pool, caches, metric series
            objects_before = live_objects()
            memory_before = tracemalloc.get_traced_memory()[0]
            await burst(mesh, port, CONNECTIONS)
            objects_after = live_objects()
            memory_after = tracemalloc.get_traced_memory()[0]
        finally:
            tracemalloc.stop()
            logging.disable(logging.NOTSET)
        assert telemetry.live_connections() == []
        grown = {
            k: n - objects_before[k] for k, n in objects_after.items() if n > objects_before[k]
        }
        assert grown == {}, f"objects kept after {CONNECTIONS} connections: {grown}"
        kept = memory_after - memory_before
        assert kept < 256 * KiB, f"{kept} bytes kept after {CONNECTIONS} connections"
    finally:
        await mesh.stop()
