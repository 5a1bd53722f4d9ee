"""Outbound (:15001): original destination -> route -> HBONE, plain TCP or passthrough.

Each accepted connection gets its own task. It reads the original destination (SO_ORIGINAL_DST
in iptables mode), asks ``routing.route_outbound`` where to go, and then either opens an HBONE
stream on a pooled mTLS connection to the next hop's :15008 (CONNECT with ``forwarded``,
``baggage`` and ``traceparent``), or connects plain TCP. A connection that cannot be routed or
connected is reset, so the application sees a refused connection rather than a hang.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import socket
import ssl
from typing import cast

from ztunnel_py.config import HBONE_SOURCE_PORTS, PORT_HBONE
from ztunnel_py.hbone.connection import HboneSettings, Role
from ztunnel_py.hbone.errors import HboneError, InvalidHeader
from ztunnel_py.hbone.headers import (
    BAGGAGE,
    Baggage,
    Forwarded,
    TraceParent,
    format_authority,
    header_value,
    new_traceparent,
    parse_baggage,
    request_headers,
)
from ztunnel_py.identity.errors import IdentityError
from ztunnel_py.identity.tls import NO_SNI, TlsVerificationError, handshake_error, verify_server
from ztunnel_py.proxy.certificates import CertificateSource, HandshakeObserver
from ztunnel_py.proxy.conntrack import OutboundConnection, tracked_outbound
from ztunnel_py.proxy.double_hbone import open_double_tunnel, tunnel_headers
from ztunnel_py.proxy.errors import UpstreamConnectError
from ztunnel_py.proxy.inbound import workload_baggage
from ztunnel_py.proxy.inputs import PodInputs, ProxyInputs
from ztunnel_py.proxy.kernel_splice import KernelSplice, SpliceOffer
from ztunnel_py.proxy.pool import WorkloadKey
from ztunnel_py.proxy.reporting import report_splice, setup_failure
from ztunnel_py.proxy.revocation import CrlManager
from ztunnel_py.proxy.routing import Route, RouteKind, RoutingError, route_outbound
from ztunnel_py.proxy.server import ProxyServer
from ztunnel_py.proxy.sockets import SocketFactory
from ztunnel_py.proxy.splice import HboneSplice, TcpSplice, TunnelFailed, TunnelRefused
from ztunnel_py.proxy.tcp import (
    CONNECT_TIMEOUT_S,
    TLS_HANDSHAKE_TIMEOUT_S,
    AcceptedSide,
    connect_socket,
    connect_tcp,
    sockaddr,
)
from ztunnel_py.proxy.transport import HboneProtocol, hbone_settings
from ztunnel_py.state.model import NetworkAddress, SocketAddr, Workload
from ztunnel_py.telemetry.connections import ConnectionRecord, Direction
from ztunnel_py.telemetry.metrics import Reporter
from ztunnel_py.telemetry.ratelimit import LimitedLog

log = logging.getLogger(__name__)
limited_log = LimitedLog(log)


class HboneConnector:
    """Dials an HBONE connection for the pool: TCP in the pod's netns, mTLS, SAN check."""

    def __init__(
        self,
        *,
        certificates: CertificateSource,
        sockets: SocketFactory,
        settings: HboneSettings,
        connect_timeout_s: float = CONNECT_TIMEOUT_S,
        handshake_timeout_s: float = TLS_HANDSHAKE_TIMEOUT_S,
        health: HandshakeObserver | None = None,
        revocation: CrlManager | None = None,
    ) -> None:
        """``health``: told the outcome of every handshake (readiness follows it);
        ``revocation``: ``CRL_PATH``'s check of the server's chain."""
        self.certificates = certificates
        self.sockets = sockets
        self.settings = settings
        self.connect_timeout_s = connect_timeout_s
        self.handshake_timeout_s = handshake_timeout_s
        self.health = health
        self.revocation = revocation

    async def __call__(self, key: WorkloadKey, on_idle: object) -> HboneProtocol:
        ctx = await self.certificates.client_context(key.src_identity)
        # HBONE on a port other than 15008 (TRANSPARENT_NETWORK_POLICIES) comes from a
        # source port the receiving pod's redirection recognises.
        sock = await connect_socket(
            self.sockets,
            key.dst,
            timeout_s=self.connect_timeout_s,
            hbone=True,
            source_ports=HBONE_SOURCE_PORTS if key.dst[1] != PORT_HBONE else None,
        )
        return await self._handshake(sock, key, ctx, on_idle)

    async def handshake(self, sock: socket.socket, key: WorkloadKey) -> HboneProtocol:
        """mTLS and HTTP/2 over a socket connected by someone else: the inner connection of
        double HBONE, over the outer stream (``double_hbone``); never pooled."""
        try:
            ctx = await self.certificates.client_context(key.src_identity)
        except BaseException:
            sock.close()
            raise
        return await self._handshake(sock, key, ctx, None)

    async def _handshake(
        self, sock: socket.socket, key: WorkloadKey, ctx: ssl.SSLContext, on_idle: object
    ) -> HboneProtocol:
        proto = HboneProtocol(
            Role.CLIENT,
            self.settings,
            on_idle=on_idle if callable(on_idle) else None,
            label=str(key),
        )
        loop = asyncio.get_running_loop()
        try:
            transport, _ = await loop.create_connection(
                lambda: proto,
                sock=sock,
                ssl=ctx,
                server_hostname=NO_SNI,
                ssl_handshake_timeout=self.handshake_timeout_s,
            )
        except ssl.SSLError as e:
            sock.close()
            error = handshake_error(e, role="server")
            if self.health is not None:
                self.health.handshake_failed(error)
            raise error from None
        except (OSError, TimeoutError) as e:
            sock.close()
            raise UpstreamConnectError(
                f"{key.dst[0]}:{key.dst[1]}", f"TLS handshake failed: {e}", hbone=True
            ) from None
        ssl_object = transport.get_extra_info("ssl_object")
        try:
            verify_server(ssl_object, key.dst_identities)
        except TlsVerificationError:
            proto.abort("server identity not expected")
            raise
        if self.revocation is not None:
            try:
                handle = self.revocation.admit(
                    ssl_object, reporter=Reporter.SOURCE, close=proto.abort
                )
            except TlsVerificationError:
                proto.abort("server certificate revoked")
                raise
            assert proto.closed is not None
            revocation = self.revocation
            proto.closed.add_done_callback(lambda _: revocation.untrack(handle))
        if self.health is not None:
            self.health.handshake_succeeded()  # the chain verified: our roots are the mesh's
        return proto


class OutboundServer(ProxyServer):
    """The :15001 listener of one pod."""

    def __init__(
        self,
        inputs: ProxyInputs,
        pod: PodInputs,
        *,
        connect_timeout_s: float = CONNECT_TIMEOUT_S,
    ) -> None:
        super().__init__("outbound", inputs, pod)
        self.demand = inputs.demand
        self.state = inputs.state
        self.pool = pod.pool
        self.original_destination = inputs.original_destination
        self.rng = inputs.rng
        self.connect_timeout_s = connect_timeout_s
        self.baggage = workload_baggage(pod.workload)
        self.hostnames = pod.hostnames
        self.kernel_splice = inputs.kernel_splice
        # The inner connections of double HBONE (never pooled): dialled like pooled ones.
        self.inner_connector = HboneConnector(
            certificates=inputs.certificates,
            sockets=pod.sockets,
            settings=hbone_settings(Role.CLIENT, inputs.config),
            health=inputs.handshakes,
        )

    async def _handle(self, down: AcceptedSide) -> None:
        transport = down.transport
        assert transport is not None
        sock = transport.get_extra_info("socket")
        peer = transport.get_extra_info("peername")
        try:
            src = sockaddr(peer)
            dst = self.original_destination.original_destination(sock)
        except (OSError, ValueError, TypeError) as e:
            # Anyone reaching :15001 can trigger this (a port scan): rate-limited.
            limited_log.warning("origdst", "outbound connection from %s refused: %s", peer, e)
            down.reset()
            return
        workload = self.state.workload(self.workload.uid) or self.workload
        src = pod_source(src, workload)
        if self.demand is not None:
            address = NetworkAddress(self.config.network, dst[0])
            if self.state.find_address(address, prefer_namespace=workload.namespace) is None:
                await self.demand(str(address))  # returns once answered, or on its timeout
        try:
            route = route_outbound(
                self.state,
                workload,
                src[0],
                dst,
                rng=self.rng,
                network=self.config.network,
                keep_port=self.config.transparent_network_policies,
            )
        except RoutingError as e:
            log.warning("outbound connection to %s:%s refused: %s", dst[0], dst[1], e)
            down.reset()
            self.telemetry.connection_rejected(
                direction=Direction.OUTBOUND, src=src, dst=dst, error=str(e)
            )
            return
        if route.resolve_hostname:
            resolved = await self._resolve(route, src, dst, workload)
            if resolved is None:
                down.reset()
                return
            route = resolved
        if route.kind is RouteKind.HBONE:
            await self._proxy_hbone(down, src, dst, route)
        elif route.kind is RouteKind.DOUBLE_HBONE:
            await self._proxy_double_hbone(down, src, dst, route)
        else:
            await self._proxy_tcp(down, src, dst, route)

    async def _resolve(
        self, route: Route, src: SocketAddr, dst: SocketAddr, workload: Workload
    ) -> Route | None:
        """ztunnel's on-demand DNS: a hostname-only workload's address, looked up now."""
        error = "no resolver for hostname workloads"
        if self.hostnames is not None:
            try:
                ip = await self.hostnames.resolve(
                    route.resolve_hostname, prefer_version=dst[0].version, source=workload
                )
            except LookupError as e:
                error = str(e)
            else:
                return route.resolved(ip)
        log.warning(
            "outbound connection to %s:%s refused: dns lookup of %s failed: %s",
            dst[0],
            dst[1],
            route.resolve_hostname,
            error,
        )
        self.telemetry.connection_rejected(
            direction=Direction.OUTBOUND, src=src, dst=dst, error=f"dns lookup failed: {error}"
        )
        return None

    def _record(
        self, src: SocketAddr, dst: SocketAddr, route: Route, trace: TraceParent
    ) -> ConnectionRecord:
        dest = route.destination_workload
        return ConnectionRecord(
            direction=Direction.OUTBOUND,
            src=src,
            dst=dst,
            src_identity=str(self.identity),
            dst_identity=str(route.identities[-1]) if route.identities else None,
            src_workload=self.workload,
            dst_workload=dest,
            dst_service=route.destination_service.hostname if route.destination_service else None,
            protocol="TCP" if route.kind in (RouteKind.TCP, RouteKind.PASSTHROUGH) else "HBONE",
            dst_addr=route.next_hop,
            hbone_addr=route.authority,
            trace_id=trace.trace_id,
        )

    async def _proxy_hbone(
        self, down: AcceptedSide, src: SocketAddr, dst: SocketAddr, route: Route
    ) -> None:
        assert route.authority is not None
        key = WorkloadKey(
            src_identity=self.identity,
            dst_identities=frozenset(route.identities),
            src_ip=src[0],
            dst=route.next_hop,
        )
        service = route.destination_service
        trace = new_traceparent(self.rng)
        headers = request_headers(
            forwarded=Forwarded(src[0], src[1], service.hostname if service else None),
            baggage=self.baggage,
            traceparent=trace,
        )
        splice = HboneSplice(down)
        record = self._record(src, dst, route, trace)
        try:
            conn, sid = await self.pool.open_stream(key, route.authority, headers, splice)
        except (UpstreamConnectError, IdentityError, HboneError, OSError) as e:
            log.warning("outbound HBONE to %s via %s failed: %s", route.authority, key.dst, e)
            down.reset()
            self._failed(record, e)
            return
        splice.bind(conn, sid)
        offer = self._offer_kernel_splice(route, conn, sid, down)
        try:
            await splice.established
        except (TunnelRefused, TunnelFailed) as e:
            log.warning("outbound HBONE to %s failed: %s", route.authority, e)
            down.reset()
            self._failed(record, e)
            return
        finally:
            if offer is not None:
                self.kernel_splice.withdraw(offer)  # type: ignore[union-attr]
        if offer is not None and offer.spliced is not None:
            # The destination's inbound side took both sockets: the kernel carries the bytes,
            # the stream only had to exist for mTLS and authorization. Ending it now frees its
            # slot on the pooled connection (neither side's sockets are its any more).
            splice.abort("spliced in the kernel")
            await self._run(offer.spliced, record)
            return
        splice.start()
        await self._run(splice, record)

    def _offer_kernel_splice(
        self, route: Route, conn: HboneProtocol, sid: int, down: AcceptedSide
    ) -> SpliceOffer | None:
        """Same node: let the destination's inbound side splice this stream in the kernel."""
        dest = route.destination_workload
        if (
            self.kernel_splice is None
            or dest is None
            or not dest.node
            or dest.node != self.config.node_name
        ):
            return None
        return self.kernel_splice.offer(conn, sid, down)

    async def _proxy_double_hbone(
        self, down: AcceptedSide, src: SocketAddr, dst: SocketAddr, route: Route
    ) -> None:
        """ztunnel's ``proxy_to_double_hbone``: the outer CONNECT to the gateway, then TLS with
        the final hop and the inner CONNECT (with ``x-forwarded-network``) inside it."""
        assert route.authority is not None
        service = route.destination_service
        trace = new_traceparent(self.rng)
        outer_headers, inner_headers = tunnel_headers(
            forwarded=Forwarded(src[0], src[1], service.hostname if service else None),
            baggage=self.baggage,
            traceparent=trace,
            origin_network=self.config.network,
        )
        outer_key = WorkloadKey(
            src_identity=self.identity,
            dst_identities=frozenset(route.identities),
            src_ip=src[0],
            dst=route.next_hop,
        )
        inner_key = dataclasses.replace(outer_key, dst_identities=frozenset(route.inner_identities))
        record = self._record(src, dst, route, trace)
        splice = HboneSplice(down)
        try:
            tunnel = await open_double_tunnel(
                self.pool,
                outer_key,
                route.authority,
                outer_headers,
                inner_key,
                self.inner_connector.handshake,
            )
        except (UpstreamConnectError, IdentityError, HboneError, OSError) as e:
            log.warning(
                "outbound double HBONE to %s via gateway %s failed: %s",
                route.authority,
                format_authority(*route.next_hop),
                e,
            )
            down.reset()
            self._failed(record, e)
            return
        try:  # the tunnel is closed however this ends (cancelled at shutdown too)
            try:
                sid = tunnel.inner.open_stream(route.authority, inner_headers, splice)
                splice.bind(tunnel.inner, sid)
                answer = await splice.established
            except (TunnelRefused, TunnelFailed, HboneError) as e:
                log.warning("outbound double HBONE to %s failed: %s", route.authority, e)
                down.reset()
                self._failed(record, e)
                return
            # The final hop's identity (checked in the handshake already): the destination
            # principal, where a direct tunnel has the next hop's.
            ssl_object = cast(ssl.SSLObject, tunnel.inner.get_extra_info("ssl_object"))
            record = dataclasses.replace(
                record,
                dst_identity=str(verify_server(ssl_object, inner_key.dst_identities)),
                dst_baggage=_lenient_baggage(header_value(answer, BAGGAGE)),
            )
            splice.start()
            await self._run(splice, record)
        finally:
            await tunnel.close("connection done")

    async def _proxy_tcp(
        self, down: AcceptedSide, src: SocketAddr, dst: SocketAddr, route: Route
    ) -> None:
        record = self._record(src, dst, route, new_traceparent(self.rng))
        try:
            up = await connect_tcp(self.sockets, route.next_hop, timeout_s=self.connect_timeout_s)
        except (UpstreamConnectError, OSError) as e:
            log.warning("outbound %s to %s failed: %s", route.kind.value, route.next_hop, e)
            down.reset()
            self._failed(record, e)
            return
        splice = TcpSplice(down, up)
        splice.start()
        await self._run(splice, record)

    def _failed(self, record: ConnectionRecord, e: Exception) -> None:
        error, flags = setup_failure(e)
        self.telemetry.connection_failed(record, error=error, flags=flags)

    async def _run(
        self, splice: HboneSplice | TcpSplice | KernelSplice, record: ConnectionRecord
    ) -> None:
        report_splice(self.telemetry, record, splice, reads_source=True)
        listed = OutboundConnection(
            self.workload.uid,
            record.src,
            record.dst,
            record.dst_addr or record.dst,
            record.protocol,
        )
        with self.tracker.tracking(splice), tracked_outbound(self.conntrack, listed):
            await splice.done


def pod_source(src: SocketAddr, workload: Workload) -> SocketAddr:
    """The application's address as the mesh knows it.

    eBPF redirection rewrites the application's ``connect()`` to 127.0.0.1:15001 before the
    kernel picks a source address, so the accepted peer is on loopback. The connection is the
    pod's all the same (and our upstream socket leaves from the pod's address): routing, the
    ``Forwarded`` header and telemetry get the pod's address of the same family, keeping the
    port. Any other source is returned as it is.
    """
    ip, port = src
    if not ip.is_loopback:
        return src
    for candidate in workload.workload_ips:
        if candidate.version == ip.version:
            return candidate, port
    return src


def _lenient_baggage(value: str | None) -> Baggage | None:
    """The final hop's response baggage (telemetry only: a malformed one is ignored)."""
    if value is None:
        return None
    try:
        return parse_baggage(value)
    except InvalidHeader:
        return None
