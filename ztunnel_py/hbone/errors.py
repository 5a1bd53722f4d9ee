"""HBONE errors: what went wrong on a tunnel or its HTTP/2 connection, for operators.

Header errors carry the offending value so a log line shows what the peer actually sent. A
protocol error in what the peer sends is not raised: ``HboneConnection`` reports it as
``ConnectionTerminated`` with the HTTP/2 error code that went out in its GOAWAY.
"""

from __future__ import annotations

from ztunnel_py.errors import ZtunnelError


class HboneError(ZtunnelError):
    """Base class of everything the HBONE core raises."""


class InvalidHeader(HboneError):
    """A CONNECT header value is malformed; the inbound side answers 400."""

    def __init__(self, name: str, value: str, reason: str) -> None:
        self.name = name
        self.value = value
        self.reason = reason
        super().__init__(f"invalid {name} header {value!r}: {reason}")


class InvalidAuthority(InvalidHeader):
    """``:authority`` is neither ``<ip>:<port>`` (IPv6 in brackets) nor ``<hostname>:<port>``."""

    def __init__(self, value: str, reason: str) -> None:
        super().__init__(":authority", value, reason)


class BadConnectRequest(HboneError):
    """The request is not a classic HTTP/2 CONNECT (wrong method, :path/:scheme, no authority)."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(f"bad HBONE request: {reason}")


class ConnectionClosed(HboneError):
    """The HTTP/2 connection can take no new tunnels (closed, or draining after GOAWAY)."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(f"HBONE connection closed: {reason}")


class StreamLimitReached(HboneError):
    """The peer's SETTINGS_MAX_CONCURRENT_STREAMS is reached; open a new connection instead."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        super().__init__(f"peer allows at most {limit} concurrent HBONE streams on one connection")


class UnknownStream(HboneError):
    """A command named a stream this connection does not have (or no longer has)."""

    def __init__(self, stream_id: int) -> None:
        self.stream_id = stream_id
        super().__init__(f"no open HBONE stream {stream_id}")


class HeaderListTooLarge(HboneError):
    """Request headers exceed the peer's SETTINGS_MAX_HEADER_LIST_SIZE."""

    def __init__(self, size: int, limit: int) -> None:
        self.size = size
        self.limit = limit
        super().__init__(
            f"HBONE request headers are {size} bytes, the peer accepts at most {limit} "
            "(shorten baggage or extra headers)"
        )
