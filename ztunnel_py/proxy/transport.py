"""asyncio adapter between a (TLS) transport and an ``HboneConnection``, both roles.

``HboneProtocol`` is an ``asyncio.Protocol``: received bytes go straight into the sans-I/O
core, its events are dispatched to per-stream ``StreamSink`` objects (the splices), and
whatever the core has to send is written at once, one write per batch of work.

Backpressure, both ways:

* Toward the peer: when the TLS transport's write buffer passes its high-water mark
  (``pause_writing``), every sink is told to stop reading its source (``pause_source``) until
  ``resume_writing``. Stream data that does not fit the HTTP/2 windows waits in the core; the
  sink stops its source until ``window_opened``.
* From the peer: HTTP/2 flow control. A sink acknowledges received bytes only when it has
  passed them on; until then the peer can send at most a stream window (4 MiB) on the stream.
  Should the peer flood us with frames we must answer (PINGs, SETTINGS) while not reading our
  answers, reading stops once the write buffer holds more than a connection window.

Server streams wait in ``_early`` from the request until the server answers them; a stream the
peer cancels meanwhile, or every one of them when the connection goes away, is reported to
``stream_abandoned`` so the work started for it (an upstream connect) stops at once. More
streams waiting than ``max_concurrent_streams`` (the peer opening and cancelling faster than
we answer) ends the connection with GOAWAY(ENHANCE_YOUR_CALM).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from typing import Protocol, cast

from h2.errors import ErrorCodes

from ztunnel_py.config import Config
from ztunnel_py.hbone.connection import HboneConnection, HboneSettings, Role
from ztunnel_py.hbone.errors import ConnectionClosed, HboneError
from ztunnel_py.hbone.events import (
    ConnectionTerminated,
    DataReceived,
    GoAwayReceived,
    HboneEvent,
    PingAcked,
    StreamEnded,
    StreamReset,
    TunnelAccepted,
    TunnelRejected,
    TunnelRequested,
    WindowOpened,
)
from ztunnel_py.telemetry.ratelimit import LimitedLog

log = logging.getLogger(__name__)
limited_log = LimitedLog(log)


def hbone_settings(role: Role, config: Config) -> HboneSettings:
    """ztunnel's HTTP/2 settings for ``role``, with the window and frame sizes of ``config``."""
    return HboneSettings.for_role(
        role,
        stream_window=config.http2_stream_window_size,
        connection_window=config.http2_connection_window_size,
        max_frame_size=config.http2_frame_size,
    )


# A send smaller than one TLS record waits for the end of the loop iteration so that the
# small sends of many streams leave together (HboneProtocol._flush_soon); larger ones go now.
COALESCE_BELOW = 16 * 1024
WRITE_HIGH_WATER_BYTES = 512 * 1024
WRITE_LOW_WATER_BYTES = 128 * 1024


class StreamSink(Protocol):
    """What an HBONE stream's consumer (a splice) is told."""

    def tunnel_accepted(self, headers: tuple[tuple[str, str], ...]) -> None: ...
    def tunnel_rejected(self, status: int, reason: str) -> None: ...
    def hbone_data(self, data: bytes, flow_controlled_length: int) -> None: ...
    def hbone_ended(self) -> None: ...
    def hbone_reset(self, error_code: int, reason: str) -> None: ...
    def window_opened(self) -> None: ...
    def pause_source(self) -> None: ...
    def resume_source(self) -> None: ...


RequestHandler = Callable[["HboneProtocol", TunnelRequested], None]


class _Early:
    """Data that arrived for a server stream before it was accepted (bounded by its window)."""

    __slots__ = ("chunks", "ended", "reset")

    def __init__(self) -> None:
        self.chunks: list[tuple[bytes, int]] = []
        self.ended = False
        self.reset: int | None = None


READ_BUFFER_BYTES = 256 * 1024
# TLS decrypts straight into this buffer (BufferedProtocol), so no 256 KiB bytes object is made
# per read (glibc would mmap and munmap each one). One buffer serves every connection of the
# loop: uvloop fills it and calls buffer_updated at once, and nothing keeps a view of it.
_READ_BUFFER = memoryview(bytearray(READ_BUFFER_BYTES))


class HboneProtocol(asyncio.BufferedProtocol):
    """One HBONE connection on a transport. Client: ``open_stream``; server: ``on_request``."""

    def __init__(
        self,
        role: Role,
        settings: HboneSettings | None = None,
        *,
        on_request: RequestHandler | None = None,
        on_idle: Callable[[HboneProtocol], None] | None = None,
        label: str = "",
    ) -> None:
        self.role = role
        self._settings = settings or HboneSettings.for_role(role)
        self._on_request = on_request
        self._on_idle = on_idle
        self.label = label
        self.conn: HboneConnection | None = None
        self.transport: asyncio.Transport | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sinks: dict[int, StreamSink] = {}
        self._early: dict[int, _Early] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._write_paused = False
        self._read_paused = False
        self._flush_scheduled = False
        self._read_pause_limit = self._settings.connection_window + 2 * 1024 * 1024
        self.closed: asyncio.Future[None] | None = None
        self.close_reason = ""
        self.streams_opened = 0

    # ------------------------------------------------------------------ asyncio.BufferedProtocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        tls = self.transport = cast(asyncio.Transport, transport)  # uvloop's are no subclasses
        self._loop = asyncio.get_running_loop()
        self.closed = self._loop.create_future()
        tls.set_write_buffer_limits(WRITE_HIGH_WATER_BYTES, WRITE_LOW_WATER_BYTES)
        self.conn = HboneConnection(self.role, self._settings, now=self._loop.time())
        self.conn.on_data = self._stream_data
        self._flush()
        self._arm_timer()

    def get_buffer(self, sizehint: int) -> memoryview:
        return _READ_BUFFER

    def buffer_updated(self, nbytes: int) -> None:
        self.data_received(_READ_BUFFER[:nbytes])

    def data_received(self, data: bytes | memoryview) -> None:
        conn = self.conn
        assert conn is not None
        events = conn.receive_data(data)
        if events:
            self._dispatch(events)
        self._flush()

    def eof_received(self) -> bool:
        self.close_reason = self.close_reason or "peer closed the connection"
        return False  # close our side too: HTTP/2 has no half-closed connections

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        reason = self.close_reason or (f"connection lost: {exc}" if exc else "connection closed")
        self.close_reason = reason
        sinks = list(self._sinks.values())
        self._sinks.clear()
        abandoned = list(self._early)
        self._early.clear()
        for sid in abandoned:
            self.stream_abandoned(sid)
        for sink in sinks:
            sink.hbone_reset(ErrorCodes.CONNECT_ERROR, reason)
        if self.closed is not None and not self.closed.done():
            self.closed.set_result(None)

    def pause_writing(self) -> None:
        self._write_paused = True
        for sink in list(self._sinks.values()):
            sink.pause_source()

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._read_paused and self.transport is not None:
            self._read_paused = False
            self.transport.resume_reading()
        for sink in list(self._sinks.values()):
            sink.resume_source()

    # ------------------------------------------------------------------ state

    @property
    def is_open(self) -> bool:
        return (
            self.transport is not None
            and not self.transport.is_closing()
            and self.conn is not None
            and not self.conn.is_terminated
        )

    @property
    def accepts_new_streams(self) -> bool:
        return self.is_open and self.conn is not None and self.conn.accepts_new_streams

    @property
    def open_streams(self) -> int:
        return len(self._sinks) + len(self._early)

    @property
    def write_paused(self) -> bool:
        return self._write_paused

    @property
    def buffered_bytes(self) -> int:
        """Bytes waiting in the transport's write buffer (tests measure backpressure with it)."""
        return self.transport.get_write_buffer_size() if self.transport is not None else 0

    def get_extra_info(self, name: str) -> object:
        return self.transport.get_extra_info(name) if self.transport is not None else None

    # ------------------------------------------------------------------ commands

    def open_stream(
        self, authority: str, headers: Iterable[tuple[str, str]], sink: StreamSink
    ) -> int:
        """Client: send CONNECT; the outcome reaches ``sink.tunnel_accepted/rejected``."""
        conn = self._require_conn()
        sid = conn.open_tunnel(authority, headers)
        self._sinks[sid] = sink
        self.streams_opened += 1
        self._flush()
        return sid

    def accept(
        self, stream_id: int, sink: StreamSink, headers: Iterable[tuple[str, str]] = ()
    ) -> None:
        """Server: answer 200 and attach ``sink``; data that came early is replayed to it.

        ``ConnectionClosed`` when the connection went away meanwhile: the caller closes what it
        opened for the stream.
        """
        conn = self._require_conn()
        if not self.is_open:
            raise ConnectionClosed(self.close_reason or "connection closed")
        early = self._early.pop(stream_id, None)
        if early is not None and early.reset is not None:
            sink.hbone_reset(early.reset, "the client reset the stream before it was accepted")
            return
        conn.accept(stream_id, headers)
        self._sinks[stream_id] = sink
        self._flush()
        if early is not None:
            for data, flow in early.chunks:
                sink.hbone_data(data, flow)
            if early.ended:
                sink.hbone_ended()

    def reject(self, stream_id: int, status: int, headers: Iterable[tuple[str, str]] = ()) -> None:
        conn = self._require_conn()
        early = self._early.pop(stream_id, None)
        if early is not None and early.reset is not None:
            return
        try:
            conn.reject(stream_id, status, headers)
        except HboneError as e:
            log.debug("could not answer %s on stream %d: %s", status, stream_id, e)
        self._flush()
        self._check_idle()

    def send(self, stream_id: int, data: bytes, end: bool = False) -> int:
        conn = self._require_conn()
        pending = conn.send(stream_id, data, end)
        if len(data) < COALESCE_BELOW:
            self._flush_soon()
        else:
            self._flush()  # already fills TLS records: waiting would only hold the memory
        return pending

    def end_stream(self, stream_id: int) -> None:
        conn = self._require_conn()
        conn.end_stream(stream_id)
        self._flush()
        self._forget_if_done(stream_id)

    def acknowledge(self, stream_id: int, amount: int) -> None:
        conn = self.conn
        if conn is None or conn.is_terminated:
            return
        if conn.acknowledge(stream_id, amount):
            self._flush()

    def reset_stream(self, stream_id: int, error_code: int = ErrorCodes.CANCEL) -> None:
        self._sinks.pop(stream_id, None)
        self._early.pop(stream_id, None)
        conn = self.conn
        if conn is None or conn.is_terminated:
            return
        conn.reset(stream_id, error_code)
        self._flush()
        self._check_idle()

    def stream_finished(self, stream_id: int) -> None:
        """A sink is done with its stream (both directions closed)."""
        self._sinks.pop(stream_id, None)
        self._check_idle()

    def drain(self) -> None:
        """GOAWAY: finish open streams, accept no new ones; close when the last one ends."""
        if self.conn is None:
            return
        self.conn.drain()
        self._flush()
        self._check_idle()

    def close(self, reason: str = "closed") -> None:
        self.close_reason = self.close_reason or reason
        if self.conn is not None and not self.conn.is_terminated:
            self.conn.close(ErrorCodes.NO_ERROR, reason)
            self._flush()
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def abort(self, reason: str) -> None:
        self.close_reason = self.close_reason or reason
        if self.transport is not None:
            self.transport.abort()

    def stream_abandoned(self, stream_id: int) -> bool:
        """Server: a stream went away before it was answered. Returns whether the work for it
        was stopped, so that nothing will answer it (a hook; here, nothing was started)."""
        return False

    def _enhance_your_calm(self, reason: str) -> None:
        conn = self.conn
        if conn is None or conn.is_terminated:
            return
        limited_log.warning(
            "calm", "HBONE connection %s closed with ENHANCE_YOUR_CALM: %s", self.label, reason
        )
        conn.close(ErrorCodes.ENHANCE_YOUR_CALM, reason)
        self.close_reason = reason

    async def wait_closed(self) -> None:
        if self.closed is not None:
            await asyncio.shield(self.closed)

    # ------------------------------------------------------------------ internals

    def _require_conn(self) -> HboneConnection:
        if self.conn is None:
            raise HboneError("HBONE connection is not established yet")
        return self.conn

    def _flush_soon(self) -> None:
        """Write the streams' small DATA once the loop has run this iteration's ready
        callbacks: what many TCP sockets send into this connection in one iteration leaves as
        one TLS write (one record up to 16 KiB, one syscall) instead of one per socket. Any
        direct ``_flush`` before then writes it too, in order."""
        if not self._flush_scheduled:
            self._flush_scheduled = True
            assert self._loop is not None  # a stream exists, so the connection was made
            self._loop.call_soon(self._scheduled_flush)

    def _scheduled_flush(self) -> None:
        self._flush_scheduled = False
        self._flush()

    def _flush(self) -> None:
        conn = self.conn
        transport = self.transport
        if conn is None or transport is None:
            return
        data = conn.data_to_send()
        if data and not transport.is_closing():
            transport.write(data)
            if not self._read_paused and transport.get_write_buffer_size() > self._read_pause_limit:
                # The peer is not reading what it makes us write: stop reading it.
                self._read_paused = True
                transport.pause_reading()
        if conn.is_terminated and not transport.is_closing():
            transport.close()

    def _dispatch(self, events: list[HboneEvent]) -> None:
        sinks = self._sinks
        for ev in events:
            # Most frequent first: this runs for every DATA frame.
            if isinstance(ev, DataReceived):
                sink = sinks.get(ev.stream_id)
                if sink is not None:
                    sink.hbone_data(ev.data, ev.flow_controlled_length)
                else:
                    self._early_for(ev.stream_id).chunks.append(
                        (ev.data, ev.flow_controlled_length)
                    )
            elif isinstance(ev, WindowOpened):
                sink = sinks.get(ev.stream_id)
                if sink is not None:
                    sink.window_opened()
            elif isinstance(ev, StreamEnded):
                sink = sinks.get(ev.stream_id)
                if sink is not None:
                    sink.hbone_ended()
                    self._forget_if_done(ev.stream_id)
                else:
                    self._early_for(ev.stream_id).ended = True
            elif isinstance(ev, TunnelRequested):
                early = _Early()
                early.ended = ev.ended
                self._early[ev.stream_id] = early
                limit = self._settings.max_concurrent_streams
                if len(self._early) > limit:
                    self._enhance_your_calm(
                        f"more than {limit} streams waiting for an answer (opened and cancelled"
                        " faster than they are answered)"
                    )
                    return
                if self._on_request is None:
                    self.reject(ev.stream_id, 503)
                else:
                    self._on_request(self, ev)
            elif isinstance(ev, TunnelAccepted):
                sink = sinks.get(ev.stream_id)
                if sink is not None:
                    sink.tunnel_accepted(ev.headers)
            elif isinstance(ev, TunnelRejected):
                sink = sinks.pop(ev.stream_id, None)
                if sink is not None:
                    sink.tunnel_rejected(ev.status, f"HBONE peer answered {ev.status}")
                self._check_idle()
            elif isinstance(ev, StreamReset):
                sink = sinks.pop(ev.stream_id, None)
                if sink is not None:
                    sink.hbone_reset(ev.error_code, _reset_reason(ev))
                else:
                    waiting = self._early.get(ev.stream_id)
                    if waiting is not None:
                        waiting.reset = ev.error_code
                        if self.stream_abandoned(ev.stream_id):
                            del self._early[ev.stream_id]
                self._check_idle()
            elif isinstance(ev, PingAcked):
                self._arm_timer()
            elif isinstance(ev, GoAwayReceived):
                self.close_reason = f"peer sent GOAWAY (last stream {ev.last_stream_id})"
                self._check_idle()
            elif isinstance(ev, ConnectionTerminated):
                self.close_reason = ev.reason
                if ev.error_code == ErrorCodes.ENHANCE_YOUR_CALM and not ev.remote:
                    limited_log.warning(
                        "calm",
                        "HBONE connection %s closed with ENHANCE_YOUR_CALM: %s",
                        self.label,
                        ev.reason,
                    )
                else:
                    log.debug("HBONE connection %s terminated: %s", self.label, ev.reason)

    def _stream_data(self, stream_id: int, data: bytes, flow_controlled_length: int) -> None:
        """Tunnel payload straight from the core (``HboneConnection.on_data``): no event."""
        sink = self._sinks.get(stream_id)
        if sink is not None:
            sink.hbone_data(data, flow_controlled_length)
        else:
            self._early_for(stream_id).chunks.append((data, flow_controlled_length))

    def _early_for(self, stream_id: int) -> _Early:
        early = self._early.get(stream_id)
        if early is None:
            early = self._early[stream_id] = _Early()
        return early

    def _forget_if_done(self, stream_id: int) -> None:
        conn = self.conn
        if conn is not None and not conn.has_stream(stream_id):
            self._sinks.pop(stream_id, None)
            self._check_idle()

    def _check_idle(self) -> None:
        if self._sinks or self._early:
            return
        conn = self.conn
        if conn is not None and not conn.accepts_new_streams and not conn.is_terminated:
            # Draining (either side sent GOAWAY) and nothing left: close.
            self.close("drained")
            return
        if self._on_idle is not None:
            self._on_idle(self)

    def _arm_timer(self) -> None:
        conn = self.conn
        loop = self._loop
        if conn is None or loop is None:
            return
        at = conn.get_timer()
        if at == self._timer_at and self._timer is not None:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_at = at
        if at is not None:
            self._timer = loop.call_at(at, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = None
        conn = self.conn
        loop = self._loop
        if conn is None or loop is None:
            return
        events = conn.handle_timer(loop.time())
        if events:
            self._dispatch(events)
        self._flush()
        self._arm_timer()


def _reset_reason(ev: StreamReset) -> str:
    try:
        name = ErrorCodes(ev.error_code).name
    except ValueError:
        name = str(ev.error_code)
    who = "peer" if ev.remote else "connection"
    return f"HBONE stream reset by {who} ({name})"
