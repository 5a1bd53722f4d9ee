"""Outbound -> HBONE (mTLS, loopback) -> inbound -> app, and back: data, half-close, resets."""

from __future__ import annotations

import asyncio
import hashlib
import socket
import struct
from collections.abc import AsyncIterator
from typing import cast

import pytest
import pytest_asyncio

from ztunnel_py.testing.proxy_harness import Mesh, bulk_app, echo_app, pattern, start_mesh

MiB = 1024 * 1024


@pytest_asyncio.fixture
async def mesh() -> AsyncIterator[Mesh]:
    m = await start_mesh()
    yield m
    await m.stop()


@pytest.mark.asyncio
async def test_request_response(mesh: Mesh) -> None:
    port = await mesh.serve_app(echo_app)
    reader, writer = await mesh.dial(port)
    for i in range(50):
        msg = pattern(1024, i)
        writer.write(msg)
        assert await reader.readexactly(1024) == msg
    writer.close()
    assert mesh.pool.connections_made == 1


@pytest.mark.asyncio
@pytest.mark.parametrize("size", [1, 100_000, 9 * MiB])
async def test_bulk_upload_checksum(mesh: Mesh, size: int) -> None:
    port = await mesh.serve_app(bulk_app)
    reader, writer = await mesh.dial(port)
    data = pattern(size, 7)
    writer.write(f"UP {size}\n".encode())
    writer.write(data)
    await writer.drain()
    answer = await reader.readline()
    assert answer.strip().decode() == hashlib.sha256(data).hexdigest()
    writer.close()


@pytest.mark.asyncio
@pytest.mark.parametrize("size", [1, 100_000, 9 * MiB])
async def test_bulk_download_checksum(mesh: Mesh, size: int) -> None:
    port = await mesh.serve_app(bulk_app)
    reader, writer = await mesh.dial(port)
    writer.write(f"DOWN {size} 3\n".encode())
    got = await reader.readexactly(size)
    assert hashlib.sha256(got).digest() == hashlib.sha256(pattern(size, 3)).digest()
    assert await reader.read() == b""  # the app's FIN arrives as EOF
    writer.close()


@pytest.mark.asyncio
async def test_client_half_close_then_reply(mesh: Mesh) -> None:
    async def reply_after_eof(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = await reader.read()  # until the client's FIN
        writer.write(b"got " + str(len(data)).encode())
        writer.close()

    port = await mesh.serve_app(reply_after_eof)
    reader, writer = await mesh.dial(port)
    writer.write(b"x" * 5000)
    writer.write_eof()
    assert await reader.read() == b"got 5000"
    writer.close()


@pytest.mark.asyncio
async def test_server_half_close_then_client_keeps_sending(mesh: Mesh) -> None:
    received = asyncio.get_running_loop().create_future()

    async def talk_first(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"hello, then FIN")
        writer.write_eof()
        received.set_result(await reader.read())
        writer.close()

    port = await mesh.serve_app(talk_first)
    reader, writer = await mesh.dial(port)
    assert await reader.read() == b"hello, then FIN"  # EOF seen, our side still open
    writer.write(b"late data after the server's FIN")
    writer.write_eof()
    assert await asyncio.wait_for(received, 5) == b"late data after the server's FIN"
    writer.close()


def _rst(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


@pytest.mark.asyncio
async def test_app_reset_reaches_the_client_as_reset(mesh: Mesh) -> None:
    async def reset_after_read(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1)
        _rst(writer)

    port = await mesh.serve_app(reset_after_read)
    reader, writer = await mesh.dial(port)
    writer.write(b"x")
    with pytest.raises(ConnectionResetError):
        while await reader.read(1024):
            pass
    writer.close()


@pytest.mark.asyncio
async def test_client_reset_reaches_the_app_as_reset(mesh: Mesh) -> None:
    outcome = asyncio.get_running_loop().create_future()

    async def wait_for_it(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"ready")
        try:
            data = await reader.read()
            outcome.set_result(("eof", data))
        except ConnectionResetError:
            outcome.set_result(("reset", b""))
        writer.close()

    port = await mesh.serve_app(wait_for_it)
    reader, writer = await mesh.dial(port)
    assert await reader.readexactly(5) == b"ready"
    _rst(writer)
    assert (await asyncio.wait_for(outcome, 5))[0] == "reset"


@pytest.mark.asyncio
async def test_unreachable_upstream_resets_the_client(mesh: Mesh) -> None:
    free = socket.socket()
    free.bind((str(mesh.server_ip), 0))
    port = free.getsockname()[1]
    free.close()  # nothing listens there now: the inbound side answers 503
    reader, writer = await mesh.dial(port)
    with pytest.raises(ConnectionResetError):
        await reader.read()
    writer.close()


@pytest.mark.asyncio
async def test_thousand_concurrent_streams_share_pooled_connections(mesh: Mesh) -> None:
    port = await mesh.serve_app(echo_app)

    async def one(i: int) -> bytes:
        reader, writer = await mesh.dial(port)
        msg = pattern(200, i)
        writer.write(msg)
        writer.write_eof()
        got = await reader.read()
        writer.close()
        return got if got == msg else b"mismatch"

    results = await asyncio.gather(*(one(i) for i in range(1000)))
    assert all(r != b"mismatch" for r in results)
    assert sum(len(r) for r in results) == 200 * 1000
    # 100 streams per connection (POOL_MAX_STREAMS_PER_CONNECTION): at least 10 connections,
    # and sharing means nowhere near one per stream.
    assert 10 <= mesh.pool.connections_made <= 20


@pytest.mark.asyncio
async def test_slow_reader_keeps_daemon_buffers_bounded(mesh: Mesh) -> None:
    size = 64 * MiB
    port = await mesh.serve_app(bulk_app)
    reader, writer = await mesh.dial(port)
    transport = cast(asyncio.Transport, writer.transport)  # uvloop's TCPTransport reads too
    transport.pause_reading()  # the application does not read for a while
    writer.write(f"DOWN {size} 5\n".encode())
    peak = 0
    for _ in range(30):
        await asyncio.sleep(0.05)
        peak = max(peak, _daemon_buffered(mesh))
    # Stream window (4 MiB) plus transport high-water marks, nowhere near the 64 MiB sent.
    assert peak < 8 * MiB, peak
    transport.resume_reading()
    got = await reader.readexactly(size)
    assert hashlib.sha256(got).digest() == hashlib.sha256(pattern(size, 5)).digest()
    writer.close()


def _daemon_buffered(mesh: Mesh) -> int:
    total = 0
    for splice in list(mesh.outbound.tracker.splices) + list(mesh.inbound.tracker.splices):
        side = getattr(splice, "tcp", None) or getattr(splice, "a", None)
        if side is not None and side.transport is not None:
            total += side.transport.get_write_buffer_size()
        hbone = getattr(splice, "hbone", None)
        if hbone is not None and hbone.conn is not None:
            total += hbone.conn.pending_bytes(splice.stream_id)  # type: ignore[attr-defined]
            total += hbone.buffered_bytes
    return total


@pytest.mark.asyncio
async def test_both_directions_at_once(mesh: Mesh) -> None:
    port = await mesh.serve_app(echo_app)
    reader, writer = await mesh.dial(port)
    data = pattern(20 * MiB, 9)

    async def send() -> None:
        for i in range(0, len(data), 256 * 1024):
            writer.write(data[i : i + 256 * 1024])
            await writer.drain()
        writer.write_eof()

    sender = asyncio.create_task(send())
    got = await reader.read(-1)
    await sender
    assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest()
    writer.close()
