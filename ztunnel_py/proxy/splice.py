"""Bidirectional copy: a TCP connection to an HBONE stream, or two TCP connections together.

Everything here is callback-driven (asyncio Protocols): a chunk read from one side is written
to the other within the same callback, without queues or awaits. Per connection, a splice
carries:

* half-close both ways: TCP FIN <-> HTTP/2 END_STREAM (``write_eof`` on the TCP side);
* resets both ways: a TCP RST (``ECONNRESET``) becomes RST_STREAM(CONNECT_ERROR), and a
  RST_STREAM, or the loss of the HBONE connection, becomes a TCP RST (``SO_LINGER`` 0);
* backpressure: a side stops reading while the other cannot take more (HTTP/2 window closed,
  TLS or TCP write buffer over its high-water mark); HBONE bytes are acknowledged to the
  peer only once the TCP side has taken them, so a slow reader holds at most a stream window;
* byte counters, and ``done`` resolving to a ``SpliceResult`` once both sides are finished.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import struct
from dataclasses import dataclass
from typing import Protocol, cast

from h2.errors import ErrorCodes

from ztunnel_py.hbone.errors import HboneError
from ztunnel_py.proxy.transport import HboneProtocol

TCP_WRITE_HIGH_WATER_BYTES = 256 * 1024
TCP_WRITE_LOW_WATER_BYTES = 64 * 1024
_LINGER_RST = struct.pack("ii", 1, 0)

# Reasons a TCP side is not reading (a bit each; reading resumes when none is left).
_PAUSE_UNATTACHED = 1
_PAUSE_WINDOW = 2  # HTTP/2 window closed: data buffered in the HBONE core
_PAUSE_PEER_WRITE = 4  # the other side's write buffer is full


@dataclass(frozen=True, slots=True)
class SpliceResult:
    #: Bytes read from the TCP side (client to server for a downstream splice).
    bytes_in: int
    #: Bytes written to the TCP side.
    bytes_out: int
    #: ``None`` for a clean close (both directions half-closed), else what went wrong.
    error: str | None = None


class _SideOwner(Protocol):
    def tcp_data(self, side: TcpSide, data: bytes) -> None: ...
    def tcp_credit(self, side: TcpSide, read: int, written: int) -> None: ...
    def tcp_eof(self, side: TcpSide) -> None: ...
    def tcp_lost(self, side: TcpSide, exc: Exception | None) -> None: ...
    def tcp_write_paused(self, side: TcpSide) -> None: ...
    def tcp_write_resumed(self, side: TcpSide) -> None: ...


class TcpSide(asyncio.Protocol):
    """One TCP connection of a splice. Reads nothing until a splice is attached."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.owner: _SideOwner | None = None
        self.connected: asyncio.Future[None] | None = None
        self._paused = _PAUSE_UNATTACHED
        self.write_paused = False
        self.eof = False
        self.lost = False
        self.lost_exc: Exception | None = None
        self.wrote_eof = False
        self._early: list[bytes] = []  # read before attach (at most one read: we pause)
        # Moved by a failed kernel splice before attach: read from this side and delivered,
        # and written to this side. Only counted (the bytes are where they belong).
        self._credit_read = 0
        self._credit_written = 0

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        tcp = self.transport = cast(asyncio.Transport, transport)  # uvloop's are no subclasses
        tcp.set_write_buffer_limits(TCP_WRITE_HIGH_WATER_BYTES, TCP_WRITE_LOW_WATER_BYTES)
        if self._paused:
            tcp.pause_reading()

    def data_received(self, data: bytes) -> None:
        owner = self.owner
        if owner is not None:
            owner.tcp_data(self, data)
        else:
            self._early.append(data)
            if self.transport is not None:
                self.transport.pause_reading()

    def eof_received(self) -> bool:
        self.eof = True
        if self.owner is not None:
            self.owner.tcp_eof(self)
        return True  # keep our write side open: that is the half-close

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.lost_exc = exc
        if self.owner is not None:
            self.owner.tcp_lost(self, exc)

    def pause_writing(self) -> None:
        self.write_paused = True
        if self.owner is not None:
            self.owner.tcp_write_paused(self)

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.owner is not None:
            self.owner.tcp_write_resumed(self)

    # control
    def attach(self, owner: _SideOwner) -> None:
        """Start splicing; events that happened while unattached are replayed."""
        self.owner = owner
        if self._credit_read or self._credit_written:
            owner.tcp_credit(self, self._credit_read, self._credit_written)
            self._credit_read = self._credit_written = 0
        early, self._early = self._early, []
        for data in early:
            owner.tcp_data(self, data)
        if self.lost:
            owner.tcp_lost(self, self.lost_exc)
            return
        if self.eof:
            owner.tcp_eof(self)
        self.resume(_PAUSE_UNATTACHED)

    def pause(self, reason: int) -> None:
        if not self._paused and self.transport is not None and not self.lost:
            self.transport.pause_reading()
        self._paused |= reason

    def resume(self, reason: int) -> None:
        if not self._paused & reason:
            return
        self._paused &= ~reason
        if not self._paused and self.transport is not None and not self.lost and not self.eof:
            self.transport.resume_reading()

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.lost:
            self.transport.write(data)

    def write_eof(self) -> None:
        if self.wrote_eof or self.transport is None or self.lost:
            return
        self.wrote_eof = True
        if self.transport.can_write_eof():
            self.transport.write_eof()

    def reset(self) -> None:
        """Abort with a TCP RST, so the application sees ECONNRESET rather than a clean EOF."""
        transport = self.transport
        if transport is None or self.lost:
            return
        sock = transport.get_extra_info("socket")
        if sock is not None:
            # If the socket is already gone, abort() below still closes the transport.
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
        transport.abort()

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    @property
    def untouched(self) -> bool:
        """Connected, not attached, no EOF or error seen: it can be handed over (with what
        ``take_early`` returns, read before the pause took effect)."""
        return self.transport is not None and self.owner is None and not (self.eof or self.lost)

    def take_early(self) -> bytes:
        """What was read before this side was paused (at most one read); forgotten here."""
        early, self._early = self._early, []
        return b"".join(early)

    def put_back_early(self, data: bytes) -> None:
        """Undo ``take_early`` (the hand-over did not happen): replayed on ``attach``."""
        self._early = [data] if data else []

    def credit(self, *, read: int, written: int) -> None:
        """Bytes moved outside any splice before ``attach`` (the kernel splice wrote what it
        had taken with ``take_early``, then could not pair): counted by the splice attached
        next, not moved again."""
        self._credit_read += read
        self._credit_written += written

    def release(self) -> socket.socket:
        """Hand the connection over (the kernel splice): a non-blocking duplicate of its
        socket. This side then neither reads, writes, resets nor closes the connection; its
        transport lets go of its own descriptor."""
        transport = self.transport
        assert transport is not None and self.untouched
        sock = transport.get_extra_info("socket")
        dup = socket.socket(fileno=os.dup(sock.fileno()))
        dup.setblocking(False)
        self.owner = None
        self.lost = True  # write, write_eof, reset and pause become no-ops
        transport.abort()  # closes its descriptor only: the connection lives on in ``dup``
        return dup


def error_text(exc: Exception | None) -> str:
    if exc is None:
        return "connection closed before both directions finished"
    if isinstance(exc, ConnectionResetError):
        return "connection reset by peer"
    return f"{type(exc).__name__}: {exc}"


class HboneSplice:
    """A TCP side and one HBONE stream (the ``StreamSink`` of that stream)."""

    def __init__(self, tcp: TcpSide) -> None:
        self.tcp = tcp
        self.hbone: HboneProtocol | None = None
        self.stream_id = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self._held_ack = 0
        self._sent_eof = False  # TCP FIN forwarded as END_STREAM
        self._got_eof = False  # END_STREAM forwarded as TCP FIN
        loop = asyncio.get_running_loop()
        self.established: asyncio.Future[tuple[tuple[str, str], ...]] = loop.create_future()
        self.done: asyncio.Future[SpliceResult] = loop.create_future()

    # ---------------------------------------------------------------- wiring

    def bind(self, hbone: HboneProtocol, stream_id: int) -> None:
        """The stream this splice feeds (before data flows)."""
        self.hbone = hbone
        self.stream_id = stream_id

    def start(self) -> None:
        """The tunnel is up: start reading the TCP side."""
        self.tcp.attach(self)
        if self.hbone is not None and self.hbone.write_paused:
            self.tcp.pause(_PAUSE_PEER_WRITE)

    def _finish(self, error: str | None) -> None:
        if not self.done.done():
            self.done.set_result(SpliceResult(self.bytes_in, self.bytes_out, error))
        self._fail_established(error or "stream closed")

    def _fail_established(self, reason: str) -> None:
        if not self.established.done():
            self.established.set_exception(TunnelFailed(reason))
            # Inbound splices never wait for this future: mark the exception as seen.
            self.established.exception()

    def _maybe_complete(self) -> None:
        if self._sent_eof and self._got_eof and not self.done.done():
            self.tcp.close()
            if self.hbone is not None:
                self.hbone.stream_finished(self.stream_id)
            self._finish(None)

    def abort(self, reason: str) -> None:
        """Tear down both sides (policy change, shutdown deadline)."""
        if self.done.done():
            return
        if self.hbone is not None:
            self.hbone.reset_stream(self.stream_id, ErrorCodes.CANCEL)
        self.tcp.reset()
        self._finish(reason)

    # ---------------------------------------------------------------- TCP side

    def tcp_data(self, side: TcpSide, data: bytes) -> None:
        hbone = self.hbone
        if hbone is None or self.done.done():
            return
        self.bytes_in += len(data)
        try:
            pending = hbone.send(self.stream_id, data)
        except HboneError:
            # The stream went away under us; its reset callback does the cleanup.
            side.pause(_PAUSE_WINDOW)
            return
        if pending:
            side.pause(_PAUSE_WINDOW)

    def tcp_credit(self, side: TcpSide, read: int, written: int) -> None:
        self.bytes_in += read
        self.bytes_out += written

    def tcp_eof(self, side: TcpSide) -> None:
        if self._sent_eof or self.hbone is None or self.done.done():
            return
        self._sent_eof = True
        try:
            self.hbone.end_stream(self.stream_id)
        except HboneError:
            return
        self._maybe_complete()

    def tcp_lost(self, side: TcpSide, exc: Exception | None) -> None:
        if self.done.done():
            return
        if self.hbone is not None:
            # A clean close after both directions finished is handled in _maybe_complete;
            # anything else (RST, or closing without a FIN) aborts the stream.
            self.hbone.reset_stream(self.stream_id, ErrorCodes.CONNECT_ERROR)
        self._finish(error_text(exc))

    def tcp_write_paused(self, side: TcpSide) -> None:
        pass  # acknowledgements are held while paused (see hbone_data)

    def tcp_write_resumed(self, side: TcpSide) -> None:
        held = self._held_ack
        if held and self.hbone is not None:
            self._held_ack = 0
            self.hbone.acknowledge(self.stream_id, held)

    # ---------------------------------------------------------------- HBONE side (StreamSink)

    def tunnel_accepted(self, headers: tuple[tuple[str, str], ...]) -> None:
        if not self.established.done():
            self.established.set_result(headers)

    def tunnel_rejected(self, status: int, reason: str) -> None:
        if not self.established.done():
            self.established.set_exception(TunnelRefused(status))
        self._finish(reason)

    def hbone_data(self, data: bytes, flow_controlled_length: int) -> None:
        tcp = self.tcp
        self.bytes_out += len(data)
        tcp.write(data)
        if tcp.write_paused:
            self._held_ack += flow_controlled_length
        elif self.hbone is not None:
            self.hbone.acknowledge(self.stream_id, flow_controlled_length)

    def hbone_ended(self) -> None:
        if self._got_eof:
            return
        self._got_eof = True
        self.tcp.write_eof()
        self._maybe_complete()

    def hbone_reset(self, error_code: int, reason: str) -> None:
        if self.done.done():
            return
        self._fail_established(reason)
        self.tcp.reset()
        self._finish(reason)

    def window_opened(self) -> None:
        self.tcp.resume(_PAUSE_WINDOW)

    def pause_source(self) -> None:
        self.tcp.pause(_PAUSE_PEER_WRITE)

    def resume_source(self) -> None:
        self.tcp.resume(_PAUSE_PEER_WRITE)


class TunnelRefused(HboneError):
    """The HBONE server answered with a status other than 200."""

    def __init__(self, status: int) -> None:
        self.status = status
        super().__init__(f"HBONE CONNECT refused with status {status}")


class TunnelFailed(HboneError):
    """The stream or its connection went away before the tunnel was established."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(f"HBONE tunnel failed: {reason}")


class TcpSplice:
    """Two TCP connections (passthrough, or plain TCP to a workload outside the mesh)."""

    def __init__(self, a: TcpSide, b: TcpSide) -> None:
        self.a = a
        self.b = b
        self.bytes_in = 0  # read from a
        self.bytes_out = 0  # written to a (read from b)
        self._eof_from: set[int] = set()
        self.done: asyncio.Future[SpliceResult] = asyncio.get_running_loop().create_future()

    def start(self) -> None:
        self.a.attach(self)
        self.b.attach(self)

    def _other(self, side: TcpSide) -> TcpSide:
        return self.b if side is self.a else self.a

    def tcp_data(self, side: TcpSide, data: bytes) -> None:
        if side is self.a:
            self.bytes_in += len(data)
            other = self.b
        else:
            self.bytes_out += len(data)
            other = self.a
        other.write(data)
        if other.write_paused:
            side.pause(_PAUSE_PEER_WRITE)

    def tcp_credit(self, side: TcpSide, read: int, written: int) -> None:
        # Each byte is read once: count the reads of both sides, not the writes.
        if side is self.a:
            self.bytes_in += read
        else:
            self.bytes_out += read

    def tcp_eof(self, side: TcpSide) -> None:
        self._eof_from.add(id(side))
        self._other(side).write_eof()
        if len(self._eof_from) == 2 and not self.done.done():
            self.a.close()
            self.b.close()
            self.done.set_result(SpliceResult(self.bytes_in, self.bytes_out, None))

    def tcp_lost(self, side: TcpSide, exc: Exception | None) -> None:
        if self.done.done():
            return
        self._other(side).reset()
        self.done.set_result(SpliceResult(self.bytes_in, self.bytes_out, error_text(exc)))

    def tcp_write_paused(self, side: TcpSide) -> None:
        self._other(side).pause(_PAUSE_PEER_WRITE)

    def tcp_write_resumed(self, side: TcpSide) -> None:
        self._other(side).resume(_PAUSE_PEER_WRITE)

    def abort(self, reason: str) -> None:
        if self.done.done():
            return
        self.a.reset()
        self.b.reset()
        self.done.set_result(SpliceResult(self.bytes_in, self.bytes_out, reason))
