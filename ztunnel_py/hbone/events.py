"""What an ``HboneConnection`` reports after ``receive_data`` or ``handle_timer``.

Events are immutable, keyword-only, and named in the past tense (h2's ``RequestReceived``
style). Headers are ``(name, value)`` pairs of ``str`` with lower-case names, pseudo-headers
included, in wire order.
"""

from __future__ import annotations

from dataclasses import dataclass

Headers = tuple[tuple[str, str], ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class HboneEvent:
    """Base class of every HBONE event."""


@dataclass(frozen=True, slots=True, kw_only=True)
class TunnelRequested(HboneEvent):
    """Server side: a peer opened a stream asking for a tunnel.

    The method is reported as sent: the server answers 400 to anything but CONNECT.
    """

    stream_id: int
    method: str
    #: The ``:authority`` pseudo-header, ``""`` when absent.
    authority: str
    headers: Headers
    #: The request already carried END_STREAM (a tunnel that will never send data).
    ended: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class TunnelAccepted(HboneEvent):
    """Client side: the server answered 200; data may flow both ways."""

    stream_id: int
    headers: Headers


@dataclass(frozen=True, slots=True, kw_only=True)
class TunnelRejected(HboneEvent):
    """Client side: the server answered with a status other than 200; the stream is over."""

    stream_id: int
    status: int
    headers: Headers


@dataclass(frozen=True, slots=True, kw_only=True)
class DataReceived(HboneEvent):
    """Tunnel payload. Hand ``flow_controlled_length`` back with ``acknowledge`` once consumed."""

    stream_id: int
    data: bytes
    flow_controlled_length: int


@dataclass(frozen=True, slots=True, kw_only=True)
class StreamEnded(HboneEvent):
    """The peer half-closed its side of the tunnel (END_STREAM): the TCP half-close."""

    stream_id: int


@dataclass(frozen=True, slots=True, kw_only=True)
class StreamReset(HboneEvent):
    """The stream was aborted: by the peer (RST_STREAM) or here, when a GOAWAY cut it off."""

    stream_id: int
    error_code: int
    remote: bool = True


@dataclass(frozen=True, slots=True, kw_only=True)
class WindowOpened(HboneEvent):
    """Every byte buffered by ``send`` on this stream has gone out; the source may read again."""

    stream_id: int


@dataclass(frozen=True, slots=True, kw_only=True)
class PingAcked(HboneEvent):
    """The peer answered a PING of ours (the keepalive deadline is cleared)."""

    data: bytes


@dataclass(frozen=True, slots=True, kw_only=True)
class GoAwayReceived(HboneEvent):
    """The peer will accept no new streams; streams up to ``last_stream_id`` may finish."""

    last_stream_id: int
    error_code: int
    additional_data: bytes = b""


@dataclass(frozen=True, slots=True, kw_only=True)
class ConnectionTerminated(HboneEvent):
    """The connection is finished: flush ``data_to_send()`` and close the transport.

    ``remote`` tells whether the peer ended it (GOAWAY with an error) or we did (a protocol
    error in what the peer sent, or a keepalive timeout).
    """

    error_code: int
    reason: str
    remote: bool
