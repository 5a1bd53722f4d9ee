"""Attacks on the inbound HBONE server (:15008) by a client holding a mesh certificate.

Each test plays one attack and checks that it stays contained: the attacker's upstream
connections are closed, the server answers with GOAWAY(ENHANCE_YOUR_CALM) where a limit is
passed, logs stay bounded, and another client is still served.
"""

from __future__ import annotations

import asyncio
import logging
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
