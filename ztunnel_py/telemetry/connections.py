"""What the proxy reports about each connection, and the sink it reports to.

The proxy servers build a ``ConnectionRecord`` per connection and tell a ``TelemetrySink``
(``ProxyTelemetry`` in the daemon, recorders in tests) when it opens, closes or fails.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from ztunnel_py.hbone.headers import Baggage
from ztunnel_py.state.model import SocketAddr, Workload
from ztunnel_py.telemetry.metrics import ResponseFlags


class Direction(enum.Enum):
    INBOUND = "inbound"
    OUTBOUND = "outbound"


@dataclass(frozen=True, slots=True, kw_only=True)
class ConnectionRecord:
    """What telemetry learns about one proxied connection (istio_tcp_* labels, access log)."""

    direction: Direction
    src: SocketAddr
    dst: SocketAddr
    src_identity: str | None = None
    dst_identity: str | None = None
    src_workload: Workload | None = None
    dst_workload: Workload | None = None
    dst_service: str | None = None  # hostname
    protocol: str = "HBONE"  # or TCP
    #: The access log's ``dst.addr`` when it is not ``dst``: the next hop of an outbound
    #: connection (``ip:15008`` when tunnelled), the :15008 an inbound tunnel arrived on.
    dst_addr: SocketAddr | None = None
    #: The CONNECT ``:authority`` of a tunnelled connection (``dst.hbone_addr``).
    hbone_addr: str | None = None
    #: W3C trace id naming the connection in the access log (ztunnel's span ``id``): the one
    #: sent in the outbound ``traceparent``, or the incoming one (a fresh one when absent).
    trace_id: int | None = None
    #: What a peer said about itself in ``baggage`` (ztunnel's derived workload): the source
    #: of an inbound tunnel, the destination of a double-HBONE one (the workload behind the
    #: east-west gateway). A source workload known to the mesh state wins over it; for the
    #: destination it wins over ``dst_workload`` (which is then the gateway).
    src_baggage: Baggage | None = None
    dst_baggage: Baggage | None = None
    #: An inbound tunnel that came through an east-west gateway (its ``x-forwarded-network``
    #: names another network): the peer address is the gateway's, so no source workload is
    #: looked up by it and the source labels come from ``src_baggage``.
    from_gateway: bool = False


#: Live byte counts of one connection: (toward the destination, back to the source).
Progress = Callable[[], tuple[int, int]]


class TelemetrySink(Protocol):
    """Where the servers report connections (metrics and access log).

    A spliced connection is ``connection_opened`` then ``connection_closed``; one that was
    refused or could not be set up once its record was known is a single
    ``connection_failed``; one refused before that (bad request, no route) is a
    ``connection_rejected``.
    """

    def connection_opened(self, record: ConnectionRecord, progress: Progress | None = None) -> None:
        """``progress`` reads the live byte counts, so bytes count while the connection lives."""
        ...

    def connection_closed(
        self,
        record: ConnectionRecord,
        *,
        bytes_sent: int,
        bytes_received: int,
        error: str | None,
        flags: ResponseFlags | None = None,
    ) -> None:
        """``bytes_sent``: toward the destination; ``bytes_received``: back to the source.
        ``flags`` says why it ended; ``None`` leaves it to the sink (``-``, or ``CONNECT``
        when there is an error)."""
        ...

    def connection_failed(
        self, record: ConnectionRecord, *, error: str, flags: ResponseFlags
    ) -> None: ...

    def connection_rejected(
        self, *, direction: Direction, src: SocketAddr, dst: SocketAddr, error: str
    ) -> None: ...


class NoTelemetry:
    """The sink of a server built without one: nothing is reported."""

    def connection_opened(self, record: ConnectionRecord, progress: Progress | None = None) -> None:
        pass

    def connection_closed(
        self,
        record: ConnectionRecord,
        *,
        bytes_sent: int,
        bytes_received: int,
        error: str | None,
        flags: ResponseFlags | None = None,
    ) -> None:
        pass

    def connection_failed(
        self, record: ConnectionRecord, *, error: str, flags: ResponseFlags
    ) -> None:
        pass

    def connection_rejected(
        self, *, direction: Direction, src: SocketAddr, dst: SocketAddr, error: str
    ) -> None:
        pass
