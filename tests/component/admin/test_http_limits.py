"""The admin/metrics/readiness HTTP server (h11) against bad and hostile clients.

Each test runs a real server on loopback and speaks raw bytes to it; after the abuse, a normal
request must still be served (the server neither died nor stalled).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from ztunnel_py.admin.http import HttpServer, Limits, Request, Response

pytestmark = pytest.mark.asyncio

LIMITS = Limits(
    max_header_bytes=2048,
    max_body_bytes=4096,
    max_connections=4,
    idle_timeout_s=0.3,
    request_timeout_s=0.5,
)


async def _echo(request: Request) -> Response:
    return Response.text(200, f"{request.method} {request.path} {len(request.body)}\n")


async def _boom(_: Request) -> Response:
    raise RuntimeError("handler bug")


@pytest_asyncio.fixture
async def server() -> AsyncIterator[HttpServer]:
    srv = HttpServer("test", {"/echo": _echo, "/boom": _boom}, limits=LIMITS)
    await srv.start("127.0.0.1", 0)
    try:
        yield srv
    finally:
        await srv.close()


async def _raw(port: int, data: bytes, *, read: bool = True) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    out = await asyncio.wait_for(reader.read(), 5) if read else b""
    writer.close()
    return out


async def _get(port: int, path: str = "/echo") -> bytes:
    return await _raw(port, f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())


def _status(reply: bytes) -> int:
    return int(reply.split(b" ", 2)[1])


async def test_serves_requests_with_keep_alive(server: HttpServer) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    for _ in range(3):
        writer.write(b"GET /echo?a=1 HTTP/1.1\r\nHost: x\r\n\r\n")
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 ")
        assert await reader.readexactly(len(b"GET /echo 0\n")) == b"GET /echo 0\n"
    writer.close()


async def test_post_body_is_read(server: HttpServer) -> None:
    reply = await _raw(
        server.port,
        b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello",
    )
    assert reply.endswith(b"POST /echo 5\n")


async def test_malformed_request_line_is_400(server: HttpServer) -> None:
    reply = await _raw(server.port, b"NONSENSE\r\n\r\n")
    assert _status(reply) == 400
    assert _status(await _get(server.port)) == 200


async def test_bad_header_line_is_400(server: HttpServer) -> None:
    reply = await _raw(server.port, b"GET /echo HTTP/1.1\r\nHost: x\r\nno colon here\r\n\r\n")
    assert _status(reply) == 400


async def test_huge_headers_are_431(server: HttpServer) -> None:
    big = b"X-Big: " + b"a" * (LIMITS.max_header_bytes * 2) + b"\r\n"
    reply = await _raw(server.port, b"GET /echo HTTP/1.1\r\nHost: x\r\n" + big + b"\r\n")
    assert _status(reply) == 431
    assert _status(await _get(server.port)) == 200


async def test_announced_huge_body_is_413_without_reading_it(server: HttpServer) -> None:
    reply = await _raw(
        server.port, b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 999999999\r\n\r\n"
    )
    assert _status(reply) == 413


async def test_chunked_body_over_the_limit_is_413(server: HttpServer) -> None:
    chunk = b"%x\r\n%s\r\n" % (3000, b"b" * 3000)
    reply = await _raw(
        server.port,
        b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" + chunk * 3,
    )
    assert _status(reply) == 413


async def test_slow_client_gets_408_and_is_closed(server: HttpServer) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(b"GET /echo HTTP/1.1\r\n")  # ... and never the rest
    reply = await asyncio.wait_for(reader.read(), 5)
    assert _status(reply) == 408
    writer.close()
    assert server.open_connections == 0


async def test_idle_keep_alive_connection_is_closed(server: HttpServer) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    assert await asyncio.wait_for(reader.read(), 5) == b""  # closed by the server, no reply
    writer.close()


async def test_connections_over_the_limit_are_closed(server: HttpServer) -> None:
    held = [await asyncio.open_connection("127.0.0.1", server.port) for _ in range(4)]
    await asyncio.sleep(0)  # let the server accept them
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    assert await asyncio.wait_for(reader.read(), 5) == b""
    writer.close()
    assert server.refused_connections >= 1
    for _, w in held:
        w.close()
    for r, _ in held:
        await asyncio.wait_for(r.read(), 5)
    assert _status(await _get(server.port)) == 200


async def test_client_gone_mid_request_does_not_hurt(server: HttpServer) -> None:
    await _raw(
        server.port, b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nab", read=False
    )
    assert _status(await _get(server.port)) == 200


async def test_handler_error_is_500_and_the_server_goes_on(server: HttpServer) -> None:
    assert _status(await _get(server.port, "/boom")) == 500
    assert _status(await _get(server.port, "/nope")) == 404
    assert _status(await _get(server.port)) == 200


async def test_head_has_no_body(server: HttpServer) -> None:
    reply = await _raw(server.port, b"HEAD /echo HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert _status(reply) == 200 and reply.endswith(b"\r\n\r\n")


async def test_binds_every_address_given_on_one_port() -> None:
    srv = HttpServer("test", {"/echo": _echo}, limits=LIMITS)
    await srv.start(["127.0.0.1", "::1"], 0)
    try:
        hosts = {a.rsplit(":", 1)[0] for a in srv.addresses}
        ports = {a.rsplit(":", 1)[1] for a in srv.addresses}
        assert "127.0.0.1" in hosts and len(ports) == 1
        if "[::1]" in hosts:  # a host without IPv6 skips ::1
            reader, writer = await asyncio.open_connection("::1", srv.port)
            writer.write(b"GET /echo HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            assert _status(await reader.read()) == 200
            writer.close()
    finally:
        await srv.close()
