"""The seams the proxy servers are built around (``typing.Protocol``s plus simple defaults).

The servers never reach for certificates, policy, original destinations, sockets or metrics
themselves: the composition root hands them these objects. Tests hand them fakes.
"""

from __future__ import annotations

import enum
import socket
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from ztunnel_py.identity.certificate import WorkloadCertificate
from ztunnel_py.identity.spiffe import Identity
from ztunnel_py.identity.tls import client_context, server_context
from ztunnel_py.rbac.evaluate import ConnectionInfo, Decision, evaluate_for
from ztunnel_py.state.model import IPAddress, Workload
from ztunnel_py.state.store import ProxyState

SocketAddr = tuple[IPAddress, int]


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


class Authorizer(Protocol):
    """Inbound L4 authorization (``rbac.evaluate``); called once per connection."""

    def check(self, conn: ConnectionInfo) -> Decision: ...


class PermitAll:
    def check(self, conn: ConnectionInfo) -> Decision:
        return Decision(True, None, "allowed: no authorizer configured")


class PolicyAuthorizer:
    """Authorizes against the policies that apply to ``workload`` in ``state``."""

    def __init__(self, state: ProxyState, workload: Workload) -> None:
        self._state = state
        self._workload = workload

    def check(self, conn: ConnectionInfo) -> Decision:
        # The store may have a newer version of the workload (policy selectors changed).
        current = self._state.workload(self._workload.uid) or self._workload
        return evaluate_for(conn, self._state, current)


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


class TelemetrySink(Protocol):
    def connection_opened(self, record: ConnectionRecord) -> None: ...

    def connection_closed(
        self, record: ConnectionRecord, *, bytes_sent: int, bytes_received: int, error: str | None
    ) -> None:
        """``bytes_sent``: toward the destination; ``bytes_received``: back to the source."""
        ...


class NoTelemetry:
    def connection_opened(self, record: ConnectionRecord) -> None:
        pass

    def connection_closed(
        self, record: ConnectionRecord, *, bytes_sent: int, bytes_received: int, error: str | None
    ) -> None:
        pass
