"""HBONE connection pool: many proxied TCP connections share one mTLS HTTP/2 connection.

Connections are keyed like ztunnel's ``WorkloadKey``: source identity, the set of identities
the destination may prove, source IP, destination socket address. Within a key:

* a connection serves at most ``POOL_MAX_STREAMS_PER_CONNECTION`` streams in its lifetime (and
  never more at once than the peer's SETTINGS_MAX_CONCURRENT_STREAMS); then a new connection
  is made and the old one closes when its last stream ends;
* concurrent callers that find no usable connection share one handshake;
* a connection with no streams for ``POOL_UNUSED_RELEASE_TIMEOUT`` is closed.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

from ztunnel_py.hbone.errors import HboneError
from ztunnel_py.identity.spiffe import Identity
from ztunnel_py.proxy.transport import HboneProtocol, StreamSink
from ztunnel_py.state.model import IPAddress

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class WorkloadKey:
    src_identity: Identity
    dst_identities: frozenset[Identity]
    src_ip: IPAddress | None
    dst: tuple[IPAddress, int]

    def __str__(self) -> str:
        ids = ",".join(sorted(str(i) for i in self.dst_identities))
        return f"{self.src_identity}@{self.src_ip} -> {self.dst[0]}:{self.dst[1]} [{ids}]"


Connector = Callable[[WorkloadKey, Callable[[HboneProtocol], None]], Awaitable[HboneProtocol]]


class _Entry:
    __slots__ = ("connecting", "live")

    def __init__(self) -> None:
        self.live: list[HboneProtocol] = []
        self.connecting: asyncio.Future[HboneProtocol] | None = None


class HbonePool:
    """``open_stream(key, authority, headers, sink)`` on a pooled connection."""

    def __init__(
        self,
        connector: Connector,
        *,
        max_streams_per_connection: int = 100,
        unused_release_timeout_s: float = 300.0,
    ) -> None:
        """``connector(key, on_idle)`` dials, handshakes and verifies a new connection whose
        ``HboneProtocol`` was built with ``on_idle``."""
        self._connector = connector
        self._max_streams = max_streams_per_connection
        self._idle_timeout = unused_release_timeout_s
        self._entries: dict[WorkloadKey, _Entry] = {}
        self._idle_timers: dict[int, asyncio.TimerHandle] = {}
        self._keys: dict[int, WorkloadKey] = {}
        self._closed = False
        self.connections_made = 0

    def connections(self, key: WorkloadKey | None = None) -> list[HboneProtocol]:
        if key is not None:
            entry = self._entries.get(key)
            return list(entry.live) if entry else []
        return [c for e in self._entries.values() for c in e.live]

    def dump(self) -> list[dict[str, Any]]:
        """Each destination's pooled connections: streams opened on each, streams open now."""
        return [
            {
                "key": str(key),
                "connecting": entry.connecting is not None,
                "connections": [
                    {"streamsOpened": c.streams_opened, "openStreams": c.open_streams}
                    for c in entry.live
                ],
            }
            for key, entry in sorted(self._entries.items(), key=lambda kv: str(kv[0]))
        ]

    async def open_stream(
        self,
        key: WorkloadKey,
        authority: str,
        headers: Iterable[tuple[str, str]],
        sink: StreamSink,
    ) -> tuple[HboneProtocol, int]:
        """A new stream toward ``key`` (CONNECT sent); the answer reaches ``sink``."""
        headers = list(headers)
        while True:
            if self._closed:
                raise HboneError("the HBONE pool is shut down")
            entry = self._entries.setdefault(key, _Entry())
            conn = self._usable(entry)
            if conn is not None:
                return conn, self._open_on(conn, key, authority, headers, sink)
            if entry.connecting is None:
                entry.connecting = asyncio.ensure_future(self._connect(key, entry))
            connecting = entry.connecting
            # Shield: one caller's cancellation must not cancel the handshake others share.
            await asyncio.shield(connecting)

    def _usable(self, entry: _Entry) -> HboneProtocol | None:
        for conn in list(entry.live):
            if not conn.accepts_new_streams:
                entry.live.remove(conn)
                continue
            if conn.streams_opened >= self._max_streams:
                entry.live.remove(conn)  # retired: closes once its streams end
                if conn.open_streams == 0:
                    conn.close("stream limit reached")
                continue
            conn_core = conn.conn
            if conn_core is not None and conn_core.open_streams >= conn_core.max_outbound_streams:
                continue
            return conn
        return None

    def _open_on(
        self,
        conn: HboneProtocol,
        key: WorkloadKey,
        authority: str,
        headers: list[tuple[str, str]],
        sink: StreamSink,
    ) -> int:
        timer = self._idle_timers.pop(id(conn), None)
        if timer is not None:
            timer.cancel()
        sid = conn.open_stream(authority, headers, sink)
        if conn.streams_opened >= self._max_streams:
            entry = self._entries.get(key)
            if entry is not None and conn in entry.live:
                entry.live.remove(conn)
        return sid

    async def _connect(self, key: WorkloadKey, entry: _Entry) -> HboneProtocol:
        try:
            conn = await self._connector(key, self._on_idle)
        finally:
            entry.connecting = None
        self.connections_made += 1
        self._keys[id(conn)] = key
        if self._closed:
            conn.close("pool shut down")
            raise HboneError("the HBONE pool is shut down")
        entry.live.append(conn)
        closed = conn.closed
        if closed is not None:
            closed.add_done_callback(lambda _f: self._forget(key, conn))
        return conn

    def _forget(self, key: WorkloadKey, conn: HboneProtocol) -> None:
        entry = self._entries.get(key)
        if entry is not None and conn in entry.live:
            entry.live.remove(conn)
            if not entry.live and entry.connecting is None:
                del self._entries[key]
        timer = self._idle_timers.pop(id(conn), None)
        if timer is not None:
            timer.cancel()
        self._keys.pop(id(conn), None)

    def _on_idle(self, conn: HboneProtocol) -> None:
        key = self._keys.get(id(conn))
        entry = self._entries.get(key) if key is not None else None
        if entry is None or conn not in entry.live:
            # Retired (stream limit) or unknown: nothing will use it again.
            conn.close("no streams left on a retired connection")
            return
        if id(conn) in self._idle_timers:
            return
        loop = asyncio.get_running_loop()
        self._idle_timers[id(conn)] = loop.call_later(
            self._idle_timeout, self._release_if_idle, conn
        )

    def _release_if_idle(self, conn: HboneProtocol) -> None:
        self._idle_timers.pop(id(conn), None)
        if conn.open_streams == 0:
            log.debug("closing HBONE connection %s: unused for %ss", conn.label, self._idle_timeout)
            conn.close("unused for POOL_UNUSED_RELEASE_TIMEOUT")

    async def close(self) -> None:
        """Close every pooled connection (GOAWAY, then close once drained)."""
        self._closed = True
        conns = self.connections()
        for timer in self._idle_timers.values():
            timer.cancel()
        self._idle_timers.clear()
        for conn in conns:
            conn.drain()
        for conn in conns:
            await conn.wait_closed()
