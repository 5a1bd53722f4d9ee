"""The adversarial suite of the inbound HBONE server (:15008): attacks by a client holding a
mesh certificate (rapid reset, CONTINUATION floods, streams past SETTINGS_MAX_CONCURRENT_STREAMS,
a reader that never reads, connections dropped mid-setup, connection storms) and by anyone who
can reach the port (half-open TLS).

Each test plays one attack and checks that it stays contained: the attacker's upstream
connections are closed, the server answers with GOAWAY(ENHANCE_YOUR_CALM) where a limit is
passed, logs, memory and file descriptors stay bounded, and another client is still served.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio
from h2.errors import ErrorCodes

from ztunnel_py.testing.hostile import (
    FRAME_CONTINUATION,
    FRAME_HEADERS,
    CountingApp,
    HostileClient,
    frame,
)
from ztunnel_py.testing.poll import wait_until_async
from ztunnel_py.testing.proxy_harness import Mesh, echo_app, start_mesh


@pytest_asyncio.fixture
async def mesh() -> AsyncIterator[Mesh]:
    m = await start_mesh()
    yield m
    await m.stop()


async def assert_still_serving(mesh: Mesh) -> None:
    port = await mesh.serve_app(echo_app)
    reader, writer = await mesh.dial(port)
    writer.write(b"still alive")
    assert await reader.readexactly(11) == b"still alive"
    writer.close()


@pytest.mark.asyncio
async def test_streams_of_a_dropped_connection_close_their_upstream_connections(
    mesh: Mesh,
) -> None:
    """CONNECTs in flight when the client vanishes must not leave upstream sockets behind."""
    app = CountingApp()
    port = await mesh.serve_app(app)
    for _ in range(5):
        client = await HostileClient.connect(mesh)
        for _ in range(40):
            client.open_connect(f"{mesh.server_ip}:{port}")
        await client.flush()
        client.abort()
    await wait_until_async(lambda: mesh.inbound.connections == 0, "the attacker's connections")
    await wait_until_async(lambda: not mesh.inbound.tracker.tasks, "the stream tasks to finish")
    await wait_until_async(lambda: not app.open, "every upstream connection to be closed")
    await assert_still_serving(mesh)


@pytest.mark.asyncio
async def test_rapid_reset_gets_goaway_and_leaves_nothing_open(
    mesh: Mesh, caplog: pytest.LogCaptureFixture
) -> None:
    app = CountingApp()
    port = await mesh.serve_app(app)
    caplog.set_level(logging.INFO)
    client = await HostileClient.connect(mesh)
    sent = 0
    while sent < 5000 and not client.closed and client.goaway is None:
        for _ in range(50):
            client.rapid_reset(f"{mesh.server_ip}:{port}")
            sent += 1
        await client.flush()
        await client.read_events()
    await asyncio.wait_for(client.until_closed(), 30)

    assert client.goaway is not None, f"no GOAWAY after {sent} reset streams"
    assert client.goaway.error_code == ErrorCodes.ENHANCE_YOUR_CALM
    assert sent < 5000
    await wait_until_async(lambda: not app.open, "every upstream connection to be closed")
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [], "a reset stream is not an error of ours"
    assert len(caplog.records) < 20, "one log line per reset stream"
    await assert_still_serving(mesh)


@pytest.mark.asyncio
async def test_continuation_floods_get_goaway_and_are_not_held(mesh: Mesh) -> None:
    """Ten connections each start a header block and keep sending CONTINUATION frames."""
    clients = [await HostileClient.connect(mesh) for _ in range(10)]
    block = clients[0].h2.encoder.encode([(b":method", b"CONNECT"), (b":authority", b"x:1")])
    filler = b"\x00" * (16 * 1024)
    for client in clients:
        await client.write_raw(frame(FRAME_HEADERS, 0, 1, block))
    for _ in range(64):  # 1 MiB per connection unless the server stops it
        for client in clients:
            await client.write_raw(frame(FRAME_CONTINUATION, 0, 1, filler))
    for client in clients:
        await asyncio.wait_for(client.until_closed(), 30)
        assert client.goaway is not None
        assert client.goaway.error_code == ErrorCodes.ENHANCE_YOUR_CALM
    await wait_until_async(lambda: mesh.inbound.connections == 0, "the flooding connections")
    await assert_still_serving(mesh)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.asyncio
async def test_streams_past_max_concurrent_streams_end_the_connection(mesh: Mesh) -> None:
    app = CountingApp()
    port = await mesh.serve_app(app)
    fds = open_fds()
    client = await HostileClient.connect(mesh)
    limit = mesh.inbound.settings.max_concurrent_streams
    client.h2.remote_settings.max_concurrent_streams = 2**31 - 1  # ignore the server's SETTINGS
    for _ in range(limit + 50):
        client.open_connect(f"{mesh.server_ip}:{port}")
    await client.flush()
    await asyncio.wait_for(client.until_closed(), 30)
    assert client.goaway is not None
    await wait_until_async(lambda: not app.open, "every upstream connection to be closed")
    await wait_until_async(lambda: mesh.inbound.connections == 0, "the connection to go")
    await wait_until_async(lambda: open_fds() <= fds, "file descriptors back to the baseline")
    await assert_still_serving(mesh)


@pytest.mark.asyncio
async def test_a_client_that_never_reads_holds_at_most_its_windows(mesh: Mesh) -> None:
    """A slow reader: the app's data stops at HTTP/2 flow control, not in our memory."""
    total = 256 * 1024 * 1024
    written = 0
    blocked = asyncio.Event()

    async def firehose(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal written
        chunk = b"z" * (1024 * 1024)
        try:
            while written < total:
                writer.write(chunk)
                written += len(chunk)
                if writer.transport.get_write_buffer_size() > 0:
                    blocked.set()  # the proxy stopped reading: backpressure reached the app
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    port = await mesh.serve_app(firehose)
    client = await HostileClient.connect(mesh)
    sid = client.open_connect(f"{mesh.server_ip}:{port}")
    await client.flush()
    # Only the response headers are read, never the data (nor any WINDOW_UPDATE sent).
    while sid not in client.statuses:
        await client.read_events(1.0)
    await asyncio.wait_for(blocked.wait(), 30)
    window = mesh.inbound.settings.stream_window + mesh.inbound.settings.connection_window
    assert written < window + 64 * 1024 * 1024, f"{written} bytes taken from the app"
    (conn,) = mesh.inbound._connections
    assert conn.buffered_bytes <= window
    await assert_still_serving(mesh)
    client.abort()


@pytest.mark.asyncio
async def test_half_open_tls_connections_are_dropped_at_the_handshake_deadline() -> None:
    mesh = await start_mesh(handshake_timeout_s=0.5)
    try:
        await assert_still_serving(mesh)  # the pool's connection and an app: part of the baseline
        fds = open_fds()
        idle = []
        for _ in range(50):
            _reader, writer = await asyncio.open_connection(str(mesh.server_ip), 15008)
            writer.write(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")  # a ClientHello's start
            idle.append(writer)
        await assert_still_serving(mesh)  # served while the half-open ones wait
        for writer in idle:
            await asyncio.wait_for(writer.transport.get_protocol()._stream_reader.read(), 30)  # type: ignore[attr-defined]
            writer.close()
        await wait_until_async(lambda: open_fds() <= fds + 1, "file descriptors back")
    finally:
        await mesh.stop()


@pytest.mark.asyncio
async def test_a_connection_storm_from_one_source_is_served_and_leaves_nothing(
    mesh: Mesh,
) -> None:
    app = CountingApp()
    port = await mesh.serve_app(app)
    fds = open_fds()

    async def one() -> int | None:
        client = await HostileClient.connect(mesh)
        sid = client.open_connect(f"{mesh.server_ip}:{port}")
        await client.flush()
        while sid not in client.statuses and not client.closed:
            await client.read_events(1.0)
        client.close()
        return client.statuses.get(sid)

    statuses = await asyncio.gather(*(one() for _ in range(200)))
    assert statuses == [200] * 200
    await wait_until_async(lambda: not app.open, "every upstream connection to be closed")
    await wait_until_async(lambda: mesh.inbound.connections == 0, "every connection to go")
    await wait_until_async(lambda: open_fds() <= fds, "file descriptors back to the baseline")
    await assert_still_serving(mesh)
