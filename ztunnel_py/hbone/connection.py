"""``HboneConnection``: one HBONE (HTTP/2 CONNECT) connection, sans-I/O, on top of h2.

The caller owns the socket: it feeds received bytes to ``receive_data`` and gets events back,
and writes whatever ``data_to_send`` returns. Time comes in through ``handle_timer(now)``, and
``get_timer()`` says when to call it next (keepalive PING every 10 s; the connection is dropped
when a PING is not answered within 20 s).

h2 is the source of truth for connection and stream state, HPACK, settings and flow-control
windows. Two things are done here instead, for measured reasons:

* **DATA fast path.** DATA frames on established tunnels (no padding, no END_STREAM) are framed
  and parsed here, and h2's window counters are updated directly. Going through h2 costs
  ~12 us per 1 KiB frame, and for large frames h2 renders every received frame with ``repr``
  (a hex dump of the whole payload) even when nothing is logged: 3 ms per 1 MiB frame, a
  ceiling of ~300 MB/s. Large received frames are also handed out as they arrive instead of
  waiting for the whole frame. Every other frame, and any DATA frame that is not plainly
  valid on an open stream, goes through h2 and gets h2's checks and error handling.
* **Header blocks** are measured here from the frame headers: h2 buffers HEADERS and
  CONTINUATION frames until END_HEADERS and applies the header-list limit only when decoding,
  so a peer could make it hold any amount. A block larger than our advertised
  ``max_header_list_size`` ends the connection with GOAWAY(ENHANCE_YOUR_CALM) before its
  payload is read (an HPACK block is never larger than the header list it encodes, give or
  take padding and priority bytes).
* **GOAWAY** frames are read here. h2 moves to CLOSED on any GOAWAY, which would abort streams
  that RFC 9113 lets finish (a peer draining gracefully, as Envoy does on shutdown).
  A graceful drain of our own is written here for the same reason.

**Tunnel payload without an event.** With ``on_data`` set (the asyncio adapter sets it),
payload of fast-path DATA frames goes straight to it as it is parsed, instead of becoming a
``DataReceived`` event: one object and one dispatch less per frame, which is most of the
frames a tunnel carries. Order is kept: while events of the same ``receive_data`` call are
still waiting to be returned, payload is queued behind them as ``DataReceived`` as before.

``send`` honours flow control: what the windows do not allow yet is buffered on the stream and
sent as WINDOW_UPDATEs arrive; ``WindowOpened`` reports that a stream's buffer is empty again.
The return value of ``send`` is the number of bytes still buffered, so the caller can stop
reading its source until ``WindowOpened``.
"""

from __future__ import annotations

import contextlib
import enum
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
from h2.connection import ConnectionState
from h2.errors import ErrorCodes
from h2.stream import StreamState

from ztunnel_py.hbone.errors import (
    ConnectionClosed,
    HboneError,
    HeaderListTooLarge,
    StreamLimitReached,
    UnknownStream,
)
from ztunnel_py.hbone.events import (
    ConnectionTerminated,
    DataReceived,
    GoAwayReceived,
    HboneEvent,
    Headers,
    PingAcked,
    StreamEnded,
    StreamReset,
    TunnelAccepted,
    TunnelRejected,
    TunnelRequested,
    WindowOpened,
)
from ztunnel_py.hbone.h2_internals import (
    consume_inbound_window,
    consume_outbound_window,
    has_output,
    headers_in_progress,
)

MiB = 1024 * 1024
DEFAULT_STREAM_WINDOW_BYTES = 4 * MiB
DEFAULT_CONNECTION_WINDOW_BYTES = 16 * MiB
DEFAULT_MAX_FRAME_BYTES = 1 * MiB
CLIENT_MAX_HEADER_LIST_BYTES = 16 * 1024
SERVER_MAX_HEADER_LIST_BYTES = 64 * 1024
SERVER_MAX_CONCURRENT_STREAMS = 200
# Streams the peer cancels before we answered them ("rapid reset", CVE-2023-44487): each one
# made us start work (an upstream connect) that the cancel throws away. When they outnumber
# the streams we accepted by more than this, the connection gets GOAWAY(ENHANCE_YOUR_CALM).
SERVER_MAX_EARLY_RESETS = 100
DEFAULT_KEEPALIVE_INTERVAL_S = 10.0
DEFAULT_KEEPALIVE_TIMEOUT_S = 20.0

_H2_DEFAULT_WINDOW = 65535
_FRAME_HEADER = struct.Struct(">BHBBL")  # length (24 bits as 8+16), type, flags, stream id
_TYPE_DATA = 0x0
_TYPE_HEADERS = 0x1
_TYPE_PUSH_PROMISE = 0x5
_TYPE_GOAWAY = 0x7
_TYPE_CONTINUATION = 0x9
_HEADER_BLOCK_TYPES = (_TYPE_HEADERS, _TYPE_PUSH_PROMISE, _TYPE_CONTINUATION)
_FLAG_END_STREAM = 0x1
_FLAG_END_HEADERS = 0x4
# Padding length, padding and priority fields that a header block's frames may add.
_HEADER_BLOCK_SLACK = 1 + 255 + 5
_FLAG_PADDED = 0x8
_CLIENT_PREFACE_LEN = 24
_RECV_DATA_STATES = (StreamState.OPEN, StreamState.HALF_CLOSED_LOCAL)
_SEND_DATA_STATES = (StreamState.OPEN, StreamState.HALF_CLOSED_REMOTE)
# Read once: an enum member looked up on its class costs ~0.3 us in Python 3.11, five times
# a global's, and the send path checks it for every DATA frame.
_CONNECTION_CLOSED = ConnectionState.CLOSED


# h2 remembers how every closed stream ended (to tell a late frame on a reset stream from a
# protocol error) up to 65,536 per connection: ~120 bytes per stream a long-lived connection
# ever carried, never given back. A few hundred recent streams are all that late frames need;
# older ones are still known closed (below the highest stream id) and answered STREAM_CLOSED.
CLOSED_STREAMS_REMEMBERED = 256


class _H2Connection(h2.connection.H2Connection):
    MAX_CLOSED_STREAMS = CLOSED_STREAMS_REMEMBERED


class Role(enum.Enum):
    CLIENT = "client"
    SERVER = "server"


@dataclass(frozen=True, slots=True, kw_only=True)
class HboneSettings:
    """HTTP/2 settings and keepalive of one side (ztunnel's values by default)."""

    stream_window: int = DEFAULT_STREAM_WINDOW_BYTES
    connection_window: int = DEFAULT_CONNECTION_WINDOW_BYTES
    max_frame_size: int = DEFAULT_MAX_FRAME_BYTES
    max_header_list_size: int = CLIENT_MAX_HEADER_LIST_BYTES
    max_concurrent_streams: int = SERVER_MAX_CONCURRENT_STREAMS
    max_early_resets: int = SERVER_MAX_EARLY_RESETS
    keepalive_interval_s: float = DEFAULT_KEEPALIVE_INTERVAL_S
    keepalive_timeout_s: float = DEFAULT_KEEPALIVE_TIMEOUT_S

    @classmethod
    def for_role(
        cls,
        role: Role,
        *,
        stream_window: int = DEFAULT_STREAM_WINDOW_BYTES,
        connection_window: int = DEFAULT_CONNECTION_WINDOW_BYTES,
        max_frame_size: int = DEFAULT_MAX_FRAME_BYTES,
    ) -> HboneSettings:
        """ztunnel's settings for ``role`` (its header limit), with these window and frame sizes."""
        header_limit = (
            CLIENT_MAX_HEADER_LIST_BYTES if role is Role.CLIENT else SERVER_MAX_HEADER_LIST_BYTES
        )
        return cls(
            stream_window=stream_window,
            connection_window=connection_window,
            max_frame_size=max_frame_size,
            max_header_list_size=header_limit,
        )


class _Stream:
    """Our bookkeeping next to h2's stream: send buffer, half-close flags."""

    __slots__ = (
        "end_after_pending",
        "fast_recv",
        "held_ack",
        "id",
        "local_ended",
        "pending",
        "pending_bytes",
        "remote_ended",
        "responded",
    )

    def __init__(self, stream_id: int, *, fast_recv: bool) -> None:
        self.id = stream_id
        self.fast_recv = fast_recv  # DATA may take the fast path (tunnel established)
        self.pending: list[bytes | memoryview] = []
        self.pending_bytes = 0
        self.end_after_pending = False
        self.local_ended = False
        self.remote_ended = False
        self.held_ack = 0  # consumed bytes not yet handed to h2 (see acknowledge)
        self.responded = True  # server streams: the 200 has been sent (DATA may follow)


def _decode_headers(raw: Iterable[tuple[bytes, bytes]]) -> Headers:
    return tuple((k.decode("latin-1"), v.decode("latin-1")) for k, v in raw)


def _header_list_size(headers: Iterable[tuple[str, str]]) -> int:
    # RFC 9113 6.5.2: name + value + 32 octets per field.
    return sum(len(k) + len(v) + 32 for k, v in headers)


class HboneConnection:
    """One side of an HBONE connection. Not thread-safe; one owner drives it."""

    def __init__(
        self, role: Role, settings: HboneSettings | None = None, *, now: float = 0.0
    ) -> None:
        self.role = role
        self.settings = settings or HboneSettings.for_role(role)
        client = role is Role.CLIENT
        self._h2 = _H2Connection(
            h2.config.H2Configuration(
                client_side=client,
                header_encoding=None,
                validate_inbound_headers=True,
                normalize_inbound_headers=True,
            )
        )
        s = self.settings
        codes = h2.settings.SettingCodes
        initial: dict[Any, int] = {
            codes.INITIAL_WINDOW_SIZE: s.stream_window,
            codes.MAX_FRAME_SIZE: s.max_frame_size,
            codes.MAX_HEADER_LIST_SIZE: s.max_header_list_size,
        }
        if client:
            initial[codes.ENABLE_PUSH] = 0
        else:
            initial[codes.MAX_CONCURRENT_STREAMS] = s.max_concurrent_streams
        # Settings in the preface take effect at once: the peer never sees smaller values.
        self._h2.local_settings = h2.settings.Settings(client=client, initial_values=initial)
        self._h2.max_inbound_frame_size = s.max_frame_size
        self._h2.decoder.max_header_list_size = s.max_header_list_size
        self._h2.initiate_connection()
        if s.connection_window > _H2_DEFAULT_WINDOW:
            self._h2.increment_flow_control_window(s.connection_window - _H2_DEFAULT_WINDOW)

        self._streams: dict[int, _Stream] = {}
        # Acknowledge in steps of at least this much: far below any window, so the peer never
        # waits on it, and it spares h2 a call per small read.
        self._ack_batch = min(16 * 1024, s.stream_window // 16)
        self._out: list[bytes | memoryview] = []
        self._events: list[HboneEvent] = []
        self._inbuf = bytearray()
        self._header_block = 0  # bytes of the header block being received (CONTINUATION)
        self._early_resets = 0  # server: streams the peer cancelled before our answer
        self._accepted = 0  # server: streams we answered with 200
        self._preface_left = 0 if client else _CLIENT_PREFACE_LEN
        self._data_sid = 0  # stream of the fast-path DATA payload being received
        self._data_left = 0  # bytes of that payload still to come
        self._window_changed = False
        self._terminated = False
        self._goaway_received = False
        self._draining = False
        self._drain_last_sid = 0
        self._ping_counter = 0
        self._ping_sent_at: float | None = None
        self._next_ping = now + s.keepalive_interval_s
        # Receives fast-path tunnel payload (stream id, bytes, flow-controlled length) as it is
        # parsed, when no event is waiting ahead of it; ``None``: everything is an event.
        self.on_data: Callable[[int, bytes, int], None] | None = None
        self._dispatch: dict[type[h2.events.Event], Callable[[Any], None]] = {
            h2.events.RequestReceived: self._on_request,
            h2.events.ResponseReceived: self._on_response,
            h2.events.DataReceived: self._on_h2_data,
            h2.events.StreamEnded: self._on_stream_ended,
            h2.events.StreamReset: self._on_stream_reset,
            h2.events.WindowUpdated: self._on_window_updated,
            h2.events.RemoteSettingsChanged: self._on_window_updated,
            h2.events.PingAckReceived: self._on_ping_ack,
        }

    # ------------------------------------------------------------------ introspection

    @property
    def is_terminated(self) -> bool:
        return self._terminated

    @property
    def accepts_new_streams(self) -> bool:
        """Whether ``open_tunnel`` may be called (no GOAWAY either way, not terminated)."""
        return not (self._terminated or self._goaway_received or self._draining)

    @property
    def open_streams(self) -> int:
        return len(self._streams)

    @property
    def max_outbound_streams(self) -> int:
        return int(self._h2.remote_settings.max_concurrent_streams)

    def has_stream(self, stream_id: int) -> bool:
        return stream_id in self._streams

    def pending_bytes(self, stream_id: int) -> int:
        st = self._streams.get(stream_id)
        return st.pending_bytes if st is not None else 0

    def send_window(self, stream_id: int) -> int:
        """Bytes that may be sent on ``stream_id`` right now (connection and stream windows)."""
        if stream_id not in self._streams:
            return 0
        return int(self._h2.local_flow_control_window(stream_id))

    # ------------------------------------------------------------------ input

    def receive_data(self, data: bytes | memoryview) -> list[HboneEvent]:
        """Process bytes from the peer; a protocol error yields ``ConnectionTerminated``.

        ``data`` may be a view of a buffer the caller reuses: nothing here keeps a reference.
        """
        if self._terminated:
            return []
        events: list[HboneEvent] = []
        self._events = events
        try:
            self._receive(data)
        except h2.exceptions.ProtocolError as e:
            # h2 has already queued a GOAWAY with e.error_code; it goes out with data_to_send.
            self._terminate(int(e.error_code), f"protocol error from peer: {e}", remote=False)
        return events

    def _receive(self, data: bytes | memoryview) -> None:
        if self._preface_left:
            take = min(self._preface_left, len(data))
            self._feed_h2(bytes(data[:take]))  # h2 checks the client magic
            self._preface_left -= take
            data = data[take:]
            if not data:
                return
        if self._inbuf:
            self._inbuf += data
            buf: bytes | bytearray | memoryview = self._inbuf
        else:
            buf = data
        end = len(buf)
        pos = 0
        slow_from = -1  # start of complete frames that go to h2 in one call
        with memoryview(buf) as mv:
            while pos < end and not self._terminated:
                if self._data_left:
                    take = min(self._data_left, end - pos)
                    self._deliver(self._data_sid, mv[pos : pos + take])
                    pos += take
                    self._data_left -= take
                    continue
                if end - pos < 9:
                    break
                hi, lo, ftype, flags, sid = _FRAME_HEADER.unpack_from(buf, pos)
                length = (hi << 16) | lo
                sid &= 0x7FFFFFFF
                if ftype == _TYPE_DATA and not flags & (_FLAG_END_STREAM | _FLAG_PADDED):
                    if slow_from >= 0:
                        self._feed_h2(bytes(mv[slow_from:pos]))
                        slow_from = -1
                    if self._take_fast_data(sid, length):
                        self._data_sid = sid
                        self._data_left = length
                        pos += 9
                        continue
                if length > self._h2.max_inbound_frame_size:
                    # Refuse from the header alone; h2 would buffer the whole payload first.
                    if slow_from >= 0:
                        self._feed_h2(bytes(mv[slow_from:pos]))
                        slow_from = -1
                    limit = self._h2.max_inbound_frame_size
                    self._h2.close_connection(error_code=ErrorCodes.FRAME_SIZE_ERROR)
                    self._terminate(
                        ErrorCodes.FRAME_SIZE_ERROR,
                        f"peer sent a {length}-byte frame, the limit is {limit}",
                        remote=False,
                    )
                    pos = end
                    break
                if ftype in _HEADER_BLOCK_TYPES and not self._header_block_fits(length):
                    if slow_from >= 0:
                        self._feed_h2(bytes(mv[slow_from:pos]))
                        slow_from = -1
                    self._calm(
                        f"peer sent a header block of more than {self._header_block_limit}"
                        " bytes (HEADERS and CONTINUATION frames)"
                    )
                    pos = end
                    break
                if end - pos < 9 + length:
                    break
                if ftype in _HEADER_BLOCK_TYPES:
                    block = self._header_block + length
                    self._header_block = 0 if flags & _FLAG_END_HEADERS else block
                if ftype == _TYPE_GOAWAY and sid == 0 and length >= 8:
                    if slow_from >= 0:
                        self._feed_h2(bytes(mv[slow_from:pos]))
                        slow_from = -1
                    self._on_goaway(bytes(mv[pos + 9 : pos + 9 + length]))
                    pos += 9 + length
                    continue
                if slow_from < 0:
                    slow_from = pos
                pos += 9 + length
            if slow_from >= 0 and not self._terminated:
                self._feed_h2(bytes(mv[slow_from:pos]))
            if pos < end:
                self._inbuf = bytearray(mv[pos:end])
            elif self._inbuf:
                self._inbuf = bytearray()
        if self._window_changed:
            self._window_changed = False
            self._flush_pending()

    @property
    def _header_block_limit(self) -> int:
        return self.settings.max_header_list_size + _HEADER_BLOCK_SLACK

    def _header_block_fits(self, length: int) -> bool:
        """Whether a header-block frame of ``length`` keeps its block within the limit."""
        return self._header_block + length <= self._header_block_limit

    def _calm(self, reason: str) -> None:
        """GOAWAY(ENHANCE_YOUR_CALM): the peer is abusing the connection."""
        self._h2.close_connection(
            error_code=ErrorCodes.ENHANCE_YOUR_CALM, additional_data=reason.encode()
        )
        self._terminate(ErrorCodes.ENHANCE_YOUR_CALM, reason, remote=False)

    def _take_fast_data(self, sid: int, length: int) -> bool:
        """Whether a DATA frame can skip h2; if so, its windows are consumed here."""
        st = self._streams.get(sid)
        if st is None or not st.fast_recv or length == 0:
            return False
        h = self._h2
        if length > h.max_inbound_frame_size or headers_in_progress(h):
            return False
        hs = h.streams.get(sid)
        if hs is None or hs.state_machine.state not in _RECV_DATA_STATES:
            return False
        return consume_inbound_window(h, hs, length)

    def _deliver(self, sid: int, chunk: memoryview) -> None:
        n = len(chunk)
        st = self._streams.get(sid)
        if st is None:
            # Reset here while the frame was arriving: give the connection window back.
            self._h2.acknowledge_received_data(n, sid)
            return
        on_data = self.on_data
        if on_data is not None and not self._events:
            on_data(sid, bytes(chunk), n)
            return
        self._events.append(
            DataReceived(stream_id=sid, data=bytes(chunk), flow_controlled_length=n)
        )

    def _feed_h2(self, data: bytes) -> None:
        """Hand complete frames to h2 (a protocol error raises out of receive_data)."""
        dispatch = self._dispatch
        for ev in self._h2.receive_data(data):
            handler = dispatch.get(type(ev))
            if handler is not None:
                handler(ev)

    # ------------------------------------------------------------------ h2 events

    def _on_request(self, ev: h2.events.RequestReceived) -> None:
        sid = ev.stream_id
        headers = _decode_headers(ev.headers or ())
        if self._draining and sid > self._drain_last_sid:
            self._safe_reset(sid, ErrorCodes.REFUSED_STREAM)
            return
        method = authority = ""
        for k, v in headers:
            if k == ":method":
                method = v
            elif k == ":authority":
                authority = v
        ended = ev.stream_ended is not None
        st = _Stream(sid, fast_recv=True)
        st.remote_ended = ended
        st.responded = False
        self._streams[sid] = st
        self._events.append(
            TunnelRequested(
                stream_id=sid, method=method, authority=authority, headers=headers, ended=ended
            )
        )

    def _on_response(self, ev: h2.events.ResponseReceived) -> None:
        sid = ev.stream_id
        st = self._streams.get(sid)
        if st is None:
            return
        headers = _decode_headers(ev.headers or ())
        status = next((v for k, v in headers if k == ":status"), "")
        if status == "200":
            st.fast_recv = True
            self._events.append(TunnelAccepted(stream_id=sid, headers=headers))
            return
        self._drop(sid)
        code = int(status) if status.isdigit() else 0
        self._events.append(TunnelRejected(stream_id=sid, status=code, headers=headers))
        # Our side is still open in h2; close it so the stream slot is freed.
        self._safe_reset(sid, ErrorCodes.CANCEL)

    def _on_h2_data(self, ev: h2.events.DataReceived) -> None:
        sid = ev.stream_id
        n = ev.flow_controlled_length or 0
        data = ev.data or b""
        if sid in self._streams and data:
            self._events.append(DataReceived(stream_id=sid, data=data, flow_controlled_length=n))
        elif n:
            # Padding, or data nobody will read: return the credit at once.
            self._h2.acknowledge_received_data(n, sid)

    def _on_stream_ended(self, ev: h2.events.StreamEnded) -> None:
        st = self._streams.get(ev.stream_id)
        if st is None or st.remote_ended:
            return  # unknown, or already reported (TunnelRequested.ended)
        st.remote_ended = True
        self._events.append(StreamEnded(stream_id=st.id))
        self._maybe_forget(st)

    def _on_stream_reset(self, ev: h2.events.StreamReset) -> None:
        st = self._drop(ev.stream_id)
        if st is None:
            return
        self._events.append(
            StreamReset(stream_id=st.id, error_code=int(ev.error_code or 0), remote=True)
        )
        if not st.responded:
            self._early_resets += 1
            limit = self.settings.max_early_resets
            if self._early_resets - self._accepted > limit:
                self._calm(
                    f"peer cancelled {self._early_resets} streams before they were answered"
                    f" ({self._accepted} accepted; the limit is {limit} more cancelled than"
                    " accepted)"
                )

    def _on_window_updated(self, _ev: h2.events.Event) -> None:
        self._window_changed = True

    def _on_ping_ack(self, ev: h2.events.PingAckReceived) -> None:
        self._ping_sent_at = None
        self._events.append(PingAcked(data=bytes(ev.ping_data or b"")))

    def _on_goaway(self, payload: bytes) -> None:
        last_sid = int.from_bytes(payload[0:4], "big") & 0x7FFFFFFF
        code = int.from_bytes(payload[4:8], "big")
        extra = payload[8:]
        self._goaway_received = True
        self._events.append(
            GoAwayReceived(last_stream_id=last_sid, error_code=code, additional_data=extra)
        )
        if code != ErrorCodes.NO_ERROR:
            detail = f": {extra.decode('utf-8', 'replace')}" if extra else ""
            self._terminate(code, f"peer sent GOAWAY ({_code_name(code)}){detail}", remote=True)
            return
        # Streams we started above last_sid were never seen by the peer.
        local_parity = 1 if self.role is Role.CLIENT else 0
        for sid in [s for s in self._streams if s > last_sid and s % 2 == local_parity]:
            self._drop(sid)
            self._safe_reset(sid, ErrorCodes.REFUSED_STREAM)
            self._events.append(
                StreamReset(stream_id=sid, error_code=ErrorCodes.REFUSED_STREAM, remote=False)
            )

    def _terminate(self, code: int, reason: str, *, remote: bool) -> None:
        self._terminated = True
        self._streams.clear()
        self._events.append(ConnectionTerminated(error_code=code, reason=reason, remote=remote))

    # ------------------------------------------------------------------ output

    def data_to_send(self) -> bytes:
        """Everything to write to the transport, in order; ``b""`` when there is nothing."""
        # h2 copies its buffer into a new bytes on every call: skip it when it is empty.
        tail = self._h2.data_to_send() if has_output(self._h2) else b""
        out = self._out
        if not out:
            return tail
        if tail:
            out.append(tail)
        data = b"".join(out)
        out.clear()
        return data

    def _sync_h2_output(self) -> None:
        # h2's own frames must precede the frames we add next.
        if has_output(self._h2):
            self._out.append(self._h2.data_to_send())

    # ------------------------------------------------------------------ commands

    def open_tunnel(self, authority: str, headers: Iterable[tuple[str, str]] = ()) -> int:
        """Client: send a CONNECT for ``authority``; returns the stream id."""
        if not self.accepts_new_streams:
            reason = "terminated" if self._terminated else "draining after GOAWAY"
            raise ConnectionClosed(reason)
        limit = self.max_outbound_streams
        if self._h2.open_outbound_streams >= limit:
            raise StreamLimitReached(limit)
        full = [(":method", "CONNECT"), (":authority", authority), *headers]
        peer_limit = self._h2.remote_settings.max_header_list_size
        size = _header_list_size(full)
        if peer_limit is not None and size > peer_limit:
            raise HeaderListTooLarge(size, int(peer_limit))
        sid = int(self._h2.get_next_available_stream_id())
        self._h2.send_headers(sid, [(k.encode(), v.encode()) for k, v in full])
        self._streams[sid] = _Stream(sid, fast_recv=False)
        return sid

    def accept(self, stream_id: int, headers: Iterable[tuple[str, str]] = ()) -> None:
        """Server: answer 200; the tunnel is established."""
        self._respond(stream_id, 200, headers, end=False)
        self._streams[stream_id].responded = True
        self._accepted += 1

    def reject(self, stream_id: int, status: int, headers: Iterable[tuple[str, str]] = ()) -> None:
        """Server: answer ``status`` (400, 401, 503...) and finish the stream."""
        self._respond(stream_id, status, headers, end=True)
        st = self._drop(stream_id)
        assert st is not None
        if not st.remote_ended:
            # The answer is complete; free the stream slot instead of waiting for the client.
            self._safe_reset(stream_id, ErrorCodes.NO_ERROR)

    def _respond(
        self, stream_id: int, status: int, headers: Iterable[tuple[str, str]], *, end: bool
    ) -> None:
        if stream_id not in self._streams:
            raise UnknownStream(stream_id)
        full = [(b":status", str(status).encode())]
        full.extend((k.encode(), v.encode()) for k, v in headers)
        try:
            self._h2.send_headers(stream_id, full, end_stream=end)
        except h2.exceptions.StreamClosedError:
            self._drop(stream_id)
            raise UnknownStream(stream_id) from None

    def send(self, stream_id: int, data: bytes | memoryview, end: bool = False) -> int:
        """Queue tunnel payload; returns the bytes still buffered for lack of window."""
        st = self._streams.get(stream_id)
        if st is None or st.local_ended or st.end_after_pending:
            raise UnknownStream(stream_id)
        if not st.responded:
            raise HboneError(f"stream {stream_id}: answer the CONNECT (accept) before sending")
        if data:
            if st.pending:
                st.pending.append(data)
                st.pending_bytes += len(data)
            else:
                sent = self._write_data(st, data)
                if sent < len(data):
                    st.pending.append(memoryview(data)[sent:])
                    st.pending_bytes = len(data) - sent
        if end:
            if st.pending_bytes:
                st.end_after_pending = True
            else:
                self._end_local(st)
        return st.pending_bytes

    def end_stream(self, stream_id: int) -> None:
        """Half-close our side (END_STREAM) once buffered data has gone out."""
        self.send(stream_id, b"", end=True)

    def _write_data(self, st: _Stream, data: bytes | memoryview) -> int:
        h = self._h2
        hs = h.streams.get(st.id)
        if (
            hs is None
            or hs.state_machine.state not in _SEND_DATA_STATES
            or h.state_machine.state is _CONNECTION_CLOSED
        ):
            raise UnknownStream(st.id)
        window = min(h.outbound_flow_control_window, hs.outbound_flow_control_window)
        total = len(data)
        n = total if total <= window else window
        if n <= 0:
            return 0
        self._sync_h2_output()
        out = self._out
        max_frame = h.max_outbound_frame_size
        sid = st.id
        if n <= max_frame:
            out.append(_FRAME_HEADER.pack(n >> 16, n & 0xFFFF, _TYPE_DATA, 0, sid))
            out.append(data if n == total else memoryview(data)[:n])
        else:
            view = memoryview(data)
            pos = 0
            while pos < n:
                k = min(max_frame, n - pos)
                out.append(_FRAME_HEADER.pack(k >> 16, k & 0xFFFF, _TYPE_DATA, 0, sid))
                out.append(view[pos : pos + k])
                pos += k
        consume_outbound_window(h, hs, n)
        return n

    def _flush_pending(self) -> None:
        for st in [s for s in self._streams.values() if s.pending]:
            while st.pending:
                chunk = st.pending[0]
                sent = self._write_data(st, chunk)
                st.pending_bytes -= sent
                if sent < len(chunk):
                    st.pending[0] = memoryview(chunk)[sent:]
                    break
                st.pending.pop(0)
            if not st.pending:
                if st.end_after_pending:
                    self._end_local(st)
                self._events.append(WindowOpened(stream_id=st.id))

    def _end_local(self, st: _Stream) -> None:
        st.end_after_pending = False
        st.local_ended = True
        try:
            self._h2.end_stream(st.id)
        except h2.exceptions.StreamClosedError:
            self._drop(st.id)
            raise UnknownStream(st.id) from None
        self._maybe_forget(st)

    def _maybe_forget(self, st: _Stream) -> None:
        if st.local_ended and st.remote_ended:
            self._drop(st.id)

    def acknowledge(self, stream_id: int, amount: int) -> bool:
        """Give ``amount`` bytes of receive window back once the payload has been consumed.

        Small amounts are added up per stream first (h2 would not send a WINDOW_UPDATE for
        them yet anyway); what is held is released when the stream goes away. Returns whether
        h2 was told (only then can there be a WINDOW_UPDATE to send).
        """
        if not amount:
            return False
        st = self._streams.get(stream_id)
        if st is not None:
            held = st.held_ack + amount
            if held < self._ack_batch:
                st.held_ack = held
                return False
            st.held_ack = 0
            amount = held
        self._h2.acknowledge_received_data(amount, stream_id)
        return True

    def _drop(self, stream_id: int) -> _Stream | None:
        """Forget a stream; acknowledgements it held go back to the connection window."""
        st = self._streams.pop(stream_id, None)
        if st is not None and st.held_ack and not self._terminated:
            held, st.held_ack = st.held_ack, 0
            self._h2.acknowledge_received_data(held, stream_id)
        return st

    def reset(self, stream_id: int, error_code: int = ErrorCodes.CANCEL) -> None:
        """Abort a stream (RST_STREAM), dropping anything buffered for it."""
        if self._drop(stream_id) is None:
            return
        self._safe_reset(stream_id, error_code)

    def _safe_reset(self, stream_id: int, error_code: int) -> None:
        # Already closed on the h2 side: nothing to tell the peer.
        with contextlib.suppress(h2.exceptions.StreamClosedError, h2.exceptions.NoSuchStreamError):
            self._h2.reset_stream(stream_id, error_code)

    def drain(self) -> None:
        """Graceful GOAWAY: no new streams, the ones already open may finish."""
        if self._draining or self._terminated:
            return
        self._draining = True
        self._drain_last_sid = int(self._h2.highest_inbound_stream_id or 0)
        self._sync_h2_output()
        payload = struct.pack(">LL", self._drain_last_sid, ErrorCodes.NO_ERROR)
        self._out.append(_FRAME_HEADER.pack(0, len(payload), _TYPE_GOAWAY, 0, 0) + payload)

    def close(self, error_code: int = ErrorCodes.NO_ERROR, reason: str = "") -> None:
        """Send GOAWAY and stop: the caller flushes ``data_to_send`` and closes the socket."""
        if self._terminated:
            return
        self._h2.close_connection(error_code=error_code, additional_data=reason.encode() or None)
        self._terminated = True
        self._streams.clear()

    # ------------------------------------------------------------------ time

    def get_timer(self) -> float | None:
        """When ``handle_timer`` must next be called, or ``None`` once terminated."""
        if self._terminated:
            return None
        if self._ping_sent_at is not None:
            return self._ping_sent_at + self.settings.keepalive_timeout_s
        return self._next_ping

    def handle_timer(self, now: float) -> list[HboneEvent]:
        """Send the keepalive PING when due; terminate when the last one went unanswered."""
        if self._terminated:
            return []
        events: list[HboneEvent] = []
        self._events = events
        s = self.settings
        if self._ping_sent_at is not None:
            if now >= self._ping_sent_at + s.keepalive_timeout_s:
                self._h2.close_connection(
                    error_code=ErrorCodes.NO_ERROR, additional_data=b"keepalive timeout"
                )
                self._terminate(
                    ErrorCodes.NO_ERROR,
                    f"no PING answer within {s.keepalive_timeout_s:g}s (keepalive timeout)",
                    remote=False,
                )
            return events
        if now >= self._next_ping:
            self._ping_counter += 1
            self._h2.ping(self._ping_counter.to_bytes(8, "big"))
            self._ping_sent_at = now
            self._next_ping = now + s.keepalive_interval_s
        return events


def _code_name(code: int) -> str:
    try:
        return ErrorCodes(code).name
    except ValueError:
        return f"error code {code}"
