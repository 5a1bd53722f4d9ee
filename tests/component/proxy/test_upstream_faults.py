"""The application behind a tunnel killed mid-traffic and started again: the client sees its
connection fail (never a hang), the proxies keep nothing of it, and new connections work as
soon as the application is back."""

from __future__ import annotations

import asyncio
import socket
import struct

import pytest

from ztunnel_py.testing.poll import wait_until_async
from ztunnel_py.testing.proxy_harness import start_mesh


@pytest.mark.asyncio
async def test_upstream_killed_mid_traffic_then_restarted() -> None:
    mesh = await start_mesh()
    try:
        live: list[asyncio.StreamWriter] = []

        async def echo_forever(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            live.append(writer)
            try:
                while data := await reader.read(65536):
                    writer.write(data)
                    await writer.drain()
            except ConnectionError:
                pass

        server = await asyncio.start_server(echo_forever, str(mesh.server_ip), 0)
        port = int(server.sockets[0].getsockname()[1])
        clients = [await mesh.dial(port) for _ in range(10)]
        for reader, writer in clients:
            writer.write(b"before")
            assert await reader.readexactly(6) == b"before"

        # kill -9 of the application: its listener and every connection go away with a reset.
        server.close()
        for writer in live:
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
        for reader, writer in clients:
            with pytest.raises(ConnectionResetError):
                await reader.read()  # reset as the application's side was: no clean EOF
            writer.close()
        await wait_until_async(
            lambda: not mesh.outbound.tracker.splices and not mesh.inbound.tracker.splices,
            "the proxies to drop the dead connections",
        )
        # While it is down: refused through the tunnel (the client sees a reset, not a hang).
        reader, writer = await mesh.dial(port)
        with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
            await reader.readexactly(1)
        writer.close()

        # Started again on the same port: served at once.
        restarted = await asyncio.start_server(
            echo_forever, str(mesh.server_ip), port, reuse_address=True
        )
        try:
            reader, writer = await mesh.dial(port)
            writer.write(b"again")
            assert await reader.readexactly(5) == b"again"
            writer.close()
            await writer.wait_closed()
        finally:
            restarted.close()
            for app_side in live:
                app_side.close()
            await restarted.wait_closed()
    finally:
        await mesh.stop()
