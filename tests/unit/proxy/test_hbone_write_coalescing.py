"""Sends of one loop iteration on one HBONE connection leave as one TLS write.

At saturation many client sockets feed one pooled HBONE connection, and uvloop runs all of
their read callbacks of an epoll batch before anything else; each ``send`` writing at once
made one TLS record and one ``write`` syscall per socket.
"""

from __future__ import annotations

import asyncio

import pytest

from tools.bench.hbone_micro import MemoryTransport, Wire
from ztunnel_py.hbone.connection import Role
from ztunnel_py.hbone.events import TunnelRequested
from ztunnel_py.proxy.splice import HboneSplice, TcpSide
from ztunnel_py.proxy.transport import COALESCE_BELOW, HboneProtocol

STREAMS = 4


async def connected(
    streams: int,
) -> tuple[Wire, list[TcpSide], list[MemoryTransport]]:
    """A client and a server HboneProtocol back to back with ``streams`` spliced streams."""
    server_apps: list[MemoryTransport] = []

    def on_request(proto: HboneProtocol, ev: TunnelRequested) -> None:
        side, app = TcpSide(), MemoryTransport()
        side.connection_made(app)
        server_apps.append(app)
        splice = HboneSplice(side)
        splice.bind(proto, ev.stream_id)
        proto.accept(ev.stream_id, splice)
        splice.start()

    client = HboneProtocol(Role.CLIENT)
    server = HboneProtocol(Role.SERVER, on_request=on_request)
    wire = Wire(client, server)
    server.connection_made(wire.to_client)
    client.connection_made(wire.to_server)
    wire.pump()
    sides = []
    for _ in range(streams):
        side = TcpSide()
        side.connection_made(MemoryTransport())
        splice = HboneSplice(side)
        splice.bind(client, client.open_stream("10.0.0.1:7000", [], splice))
        wire.pump()
        await asyncio.wait_for(splice.established, 5)
        splice.start()
        sides.append(side)
    await asyncio.sleep(0)
    wire.pump()
    assert len(server_apps) == streams

    return wire, sides, server_apps


@pytest.mark.asyncio
async def test_the_sends_of_one_iteration_leave_in_one_write_in_order() -> None:
    wire, sides, server_apps = await connected(STREAMS)
    for i, side in enumerate(sides):  # what uvloop does for an epoll batch of ready sockets
        side.data_received(bytes([65 + i]) * 1000)
        side.data_received(bytes([97 + i]) * 10)
    assert wire.to_server.written == []  # nothing written before the loop turns
    await asyncio.sleep(0)
    assert len(wire.to_server.written) == 1
    assert len(wire.to_server.written[0]) == STREAMS * (2 * 9 + 1010)  # 2 DATA frames each
    wire.pump()
    for i, app in enumerate(server_apps):
        assert b"".join(app.written) == bytes([65 + i]) * 1000 + bytes([97 + i]) * 10


@pytest.mark.asyncio
async def test_a_send_of_a_whole_record_or_more_is_written_at_once_after_waiting_ones() -> None:
    """Bulk: a read of a TLS record or more leaves in the same callback (holding it would only
    hold memory), and the small sends waiting for the loop turn leave before it."""
    wire, sides, server_apps = await connected(2)
    sides[0].data_received(b"s" * 100)
    assert wire.to_server.written == []
    sides[1].data_received(b"L" * COALESCE_BELOW)
    assert len(wire.to_server.written) == 1  # both, at once, in order
    await asyncio.sleep(0)
    assert len(wire.to_server.written) == 1  # the scheduled flush found nothing left
    wire.pump()
    assert b"".join(server_apps[0].written) == b"s" * 100
    assert b"".join(server_apps[1].written) == b"L" * COALESCE_BELOW
