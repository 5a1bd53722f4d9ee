"""The seams the proxy servers are built around (``typing.Protocol``s plus simple defaults).

The servers never reach for certificates, policy, original destinations, sockets or metrics
themselves: the composition root hands them these objects. Tests hand them fakes. The servers
report to the telemetry seam through ``report_splice`` and ``setup_failure``.
"""

from __future__ import annotations

import asyncio
import enum
import http
import logging
import socket
import ssl
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Protocol

from ztunnel_py.identity.certificate import WorkloadCertificate
from ztunnel_py.identity.errors import IdentityError
from ztunnel_py.identity.spiffe import Identity
from ztunnel_py.identity.tls import TlsVerificationError, client_context, server_context
from ztunnel_py.proxy.conntrack import POLICY_CHANGE_ERROR
from ztunnel_py.proxy.splice import SpliceResult, TunnelRefused
from ztunnel_py.rbac.evaluate import ConnectionInfo, Decision, evaluate_for, log_decision
from ztunnel_py.state.model import IPAddress, Workload
from ztunnel_py.state.store import ProxyState
from ztunnel_py.telemetry.metrics import ResponseFlags

SocketAddr = tuple[IPAddress, int]
#: Where authorization decisions are logged (``AUTHZ_POLICY_INFO_LOGGING``).
AUTHORIZATION_LOGGER = "ztunnel_py.rbac"


class CertificateSource(Protocol):
    """TLS contexts carrying the certificate of an identity (fetched, cached, rotated)."""

    async def client_context(self, identity: Identity) -> ssl.SSLContext: ...
    async def server_context(self, identity: Identity) -> ssl.SSLContext: ...


class FetchedCertificates:
    """A ``CertificateSource`` over any ``fetch(identity) -> WorkloadCertificate``
    (``SecretManager.fetch_certificate`` in the daemon, a test CA in tests)."""

    def __init__(
        self,
        fetch: Callable[[Identity], Awaitable[WorkloadCertificate]],
        *,
        tls12_enabled: bool = False,
    ) -> None:
        self._fetch = fetch
        self._tls12 = tls12_enabled

    async def client_context(self, identity: Identity) -> ssl.SSLContext:
        return client_context(await self._fetch(identity), tls12_enabled=self._tls12)

    async def server_context(self, identity: Identity) -> ssl.SSLContext:
        return server_context(await self._fetch(identity), tls12_enabled=self._tls12)


class HandshakeObserver(Protocol):
    """Told how each outbound mTLS handshake went (``identity.mtls_health`` for readiness)."""

    def handshake_succeeded(self) -> None: ...
    def handshake_failed(self, error: Exception) -> None: ...


class Authorizer(Protocol):
    """Inbound L4 authorization (``rbac.evaluate``); called once per connection."""

    def check(self, conn: ConnectionInfo) -> Decision: ...


class PermitAll:
    def check(self, conn: ConnectionInfo) -> Decision:
        return Decision(True, None, "allowed: no authorizer configured")


class PolicyAuthorizer:
    """Authorizes against the policies that apply to ``workload`` in ``state``.

    Every decision is logged, naming the deciding policy: at INFO with ``info_logging``
    (``AUTHZ_POLICY_INFO_LOGGING=true``), at DEBUG otherwise, as ztunnel's ``authpol_log``.
    """

    def __init__(
        self,
        state: ProxyState,
        workload: Workload,
        *,
        info_logging: bool = False,
        logger: logging.Logger | None = None,
    ) -> None:
        self._state = state
        self._workload = workload
        self._info_logging = info_logging
        self._logger = logger or logging.getLogger(AUTHORIZATION_LOGGER)

    def check(self, conn: ConnectionInfo) -> Decision:
        # The store may have a newer version of the workload (policy selectors changed).
        current = self._state.workload(self._workload.uid) or self._workload
        decision = evaluate_for(conn, self._state, current)
        log_decision(self._logger, decision, conn, self._info_logging)
        return decision


# ``XDS_ON_DEMAND``: ask istiod for one resource (``network/ip`` or a workload uid) and wait
# until it answered (or gave up); the state store then holds it if it exists.
Demand = Callable[[str], Coroutine[Any, Any, None]]


class OriginalDestination(Protocol):
    """Where an accepted outbound connection was going before it was redirected to :15001."""

    def original_destination(self, sock: socket.socket) -> SocketAddr: ...


class SocketFactory(Protocol):
    """Upstream sockets, made in the pod's netns with the daemon's mark and keepalives."""

    def upstream_socket(self, family: int, *, source: IPAddress | None = None) -> socket.socket:
        """A non-blocking TCP socket; with ``source``, bound to it (original-source spoofing)."""
        ...


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


class CountedSplice(Protocol):
    """What ``report_splice`` reads of a ``TcpSplice`` or ``HboneSplice``."""

    @property
    def bytes_in(self) -> int: ...
    @property
    def bytes_out(self) -> int: ...
    @property
    def done(self) -> asyncio.Future[SpliceResult]: ...


def report_splice(
    telemetry: TelemetrySink, record: ConnectionRecord, splice: CountedSplice, *, reads_source: bool
) -> None:
    """Report a spliced connection as opened, with its live byte counts, and as closed once
    the splice is done.

    ``reads_source``: the splice's ``bytes_in`` are read from the source (outbound, inbound
    plaintext) rather than from the destination (inbound HBONE, whose TCP side is the app).
    The close is reported from the splice itself, so a handler cancelled at shutdown still
    reports it.
    """

    def progress() -> tuple[int, int]:
        if reads_source:
            return splice.bytes_in, splice.bytes_out
        return splice.bytes_out, splice.bytes_in

    def closed(done: asyncio.Future[SpliceResult]) -> None:
        if done.cancelled():
            toward, back = progress()
            error: str | None = "connection cancelled"
        else:
            result = done.result()
            toward, back = (
                (result.bytes_in, result.bytes_out)
                if reads_source
                else (result.bytes_out, result.bytes_in)
            )
            error = result.error
        # A tracked connection aborted on a policy update (conntrack) ends as a denial.
        flags = ResponseFlags.DENY if error == POLICY_CHANGE_ERROR else None
        telemetry.connection_closed(
            record, bytes_sent=toward, bytes_received=back, error=error, flags=flags
        )

    telemetry.connection_opened(record, progress)
    splice.done.add_done_callback(closed)


def setup_failure(e: Exception) -> tuple[str, ResponseFlags]:
    """The access log error and response flag of a connection that never got spliced."""
    if isinstance(e, TunnelRefused):
        try:
            status = f"{e.status} {http.HTTPStatus(e.status).phrase}"
        except ValueError:
            status = str(e.status)
        flags = ResponseFlags.DENY if e.status == 401 else ResponseFlags.CONNECT
        return f"http status: {status}", flags
    if isinstance(e, TlsVerificationError):
        return f"tls error: {e}", ResponseFlags.TLS_FAILURE
    if isinstance(e, IdentityError):
        return f"identity error: {e}", ResponseFlags.IDENTITY_ERROR
    if isinstance(e, OSError):
        return f"connection failed: {e}", ResponseFlags.CONNECT
    return str(e), ResponseFlags.CONNECT  # our own errors already say what failed
