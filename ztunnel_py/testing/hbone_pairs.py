"""In-memory HBONE client/server pairs for the pure-core tests (h2's ``_xfer`` style)."""

from __future__ import annotations

from typing import TypeVar

from ztunnel_py.hbone.connection import HboneConnection, HboneSettings, Role
from ztunnel_py.hbone.events import DataReceived, HboneEvent


def pair(
    client_settings: HboneSettings | None = None, server_settings: HboneSettings | None = None
) -> tuple[HboneConnection, HboneConnection]:
    client = HboneConnection(Role.CLIENT, client_settings)
    server = HboneConnection(Role.SERVER, server_settings)
    xfer(client, server)
    return client, server


def xfer(
    client: HboneConnection, server: HboneConnection, *, chunk: int | None = None
) -> tuple[list[HboneEvent], list[HboneEvent]]:
    """Move bytes both ways until both sides are quiet; returns (client events, server events).

    With ``chunk``, bytes are fed in pieces of that size (1 = byte at a time).
    """
    client_events: list[HboneEvent] = []
    server_events: list[HboneEvent] = []
    for _ in range(100):
        to_server = client.data_to_send()
        to_client = server.data_to_send()
        if not to_server and not to_client:
            return client_events, server_events
        server_events.extend(feed(server, to_server, chunk))
        client_events.extend(feed(client, to_client, chunk))
    raise AssertionError("connections never went quiet")


def feed(conn: HboneConnection, data: bytes, chunk: int | None) -> list[HboneEvent]:
    if not data:
        return []
    if chunk is None:
        return conn.receive_data(data)
    events: list[HboneEvent] = []
    for i in range(0, len(data), chunk):
        events.extend(conn.receive_data(data[i : i + chunk]))
    return events


def payload(events: list[HboneEvent], stream_id: int) -> bytes:
    return b"".join(
        e.data for e in events if isinstance(e, DataReceived) and e.stream_id == stream_id
    )


def ack_all(conn: HboneConnection, events: list[HboneEvent]) -> None:
    for e in events:
        if isinstance(e, DataReceived):
            conn.acknowledge(e.stream_id, e.flow_controlled_length)


E = TypeVar("E", bound=HboneEvent)


def of_type(events: list[HboneEvent], kind: type[E]) -> list[E]:
    return [e for e in events if isinstance(e, kind)]


def open_accepted(
    client: HboneConnection, server: HboneConnection, authority: str = "10.0.0.2:80"
) -> int:
    sid = client.open_tunnel(authority)
    xfer(client, server)
    server.accept(sid)
    xfer(client, server)
    return sid
