"""Inbound HBONE (:15008): mTLS as the pod, CONNECT, authorization, then splice to the app.

Order of work (ztunnel ``Inbound::serve_connect``):

1. TLS accept with the certificate of the pod whose netns holds the listener; the client's
   trust domain must be ours (``verify_client``), its identity goes to authorization;
2. per stream: parse the request (400 on anything but a classic CONNECT with good headers);
3. validate ``:authority``: an IP must be this pod's, a hostname must be a service in the pod's
   namespace that the pod backs (400 otherwise); resolve the target port, refuse the proxy's
   own ports (``SelfCall``, 400) and ports the pod does not serve (503). Another IP is
   accepted, and served by this pod on the requested port, when this pod has an application
   tunnel (it gets the target itself) or is the waypoint of that IP's workload or service
   (ztunnel's "waypoint sandwich", ``routing.is_waypoint_of``; with ``XDS_ON_DEMAND`` an
   unknown IP is fetched first);
4. authorize with dst = pod IP and target port (401 on deny);
5. connect upstream in the pod's netns (from the client's IP with ``ENABLE_ORIG_SRC``; a PROXY
   app tunnel loopback to loopback with ``LOCALHOST_APP_TUNNEL``) and, for a PROXY app
   tunnel, write the PROXY v2 header (``proxy/app_tunnel.py``); 503 when that fails;
6. answer 200 (with the destination's baggage) and splice.

Telemetry takes the source's ``baggage`` for the labels a known source workload does not
give; a tunnel whose ``x-forwarded-network`` names another network came through an east-west
gateway (``from_gateway``): its peer address is the gateway's, so the source is the baggage
and the verified identity alone (docs/multi-network.md).

Every connection and every stream is handled in its own task or callback chain; what a peer
sends can fail its own stream or connection, never the server. A stream's task is cancelled
when the peer resets the stream or drops the connection before the answer, so an upstream
connection is never opened for nobody ("rapid reset" costs the attacker as much as us).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import time
from typing import cast

from ztunnel_py.config import PORT_HBONE, PORT_INBOUND_PLAINTEXT, PORT_OUTBOUND, PORT_SOCKS5
from ztunnel_py.hbone.connection import HboneSettings, Role
from ztunnel_py.hbone.errors import BadConnectRequest, HboneError, InvalidHeader
from ztunnel_py.hbone.events import TunnelRequested
from ztunnel_py.hbone.headers import (
    Authority,
    Baggage,
    ConnectRequest,
    new_traceparent,
    parse_connect_request,
    response_headers,
)
from ztunnel_py.identity.tls import TlsVerificationError, verify_client
from ztunnel_py.proxy.app_tunnel import (
    AppTunnelError,
    TunnelRequest,
    proxy_v2_header,
    tunnel_request,
    upstream_route,
)
from ztunnel_py.proxy.conntrack import tracked
from ztunnel_py.proxy.errors import (
    BadRequest,
    InboundRefused,
    PolicyDenied,
    SelfCall,
    UpstreamConnectError,
    UpstreamUnavailable,
)
from ztunnel_py.proxy.inputs import PodInputs, ProxyInputs
from ztunnel_py.proxy.kernel_splice import KernelSplice
from ztunnel_py.proxy.reporting import report_splice, setup_failure
from ztunnel_py.proxy.revocation import RevocationHandle
from ztunnel_py.proxy.routing import is_waypoint_of
from ztunnel_py.proxy.server import ProxyServer
from ztunnel_py.proxy.splice import HboneSplice
from ztunnel_py.proxy.tcp import (
    CONNECT_TIMEOUT_S,
    LISTEN_BACKLOG,
    TLS_HANDSHAKE_TIMEOUT_S,
    connect_tcp,
    sockaddr,
)
from ztunnel_py.proxy.transport import HboneProtocol, hbone_settings
from ztunnel_py.rbac.evaluate import ConnectionInfo
from ztunnel_py.state.model import (
    AppTunnelProtocol,
    IPAddress,
    NetworkAddress,
    Service,
    SocketAddr,
    Workload,
)
from ztunnel_py.telemetry.connections import ConnectionRecord, Direction
from ztunnel_py.telemetry.metrics import Reporter, ResponseFlags
from ztunnel_py.telemetry.ratelimit import LimitedLog

log = logging.getLogger(__name__)
limited_log = LimitedLog(log)

ILLEGAL_PORTS = frozenset({PORT_OUTBOUND, PORT_INBOUND_PLAINTEXT, PORT_HBONE, PORT_SOCKS5})
# How often accepted connections make us ask for the current certificate (rotation).
CERTIFICATE_REFRESH_S = 30.0


def workload_baggage(w: Workload) -> Baggage:
    return Baggage(
        cluster_id=w.cluster_id or None,
        namespace=w.namespace or None,
        workload_type=w.workload_type,
        workload_name=w.workload_name or w.name or None,
        service_name=w.canonical_name or None,
        revision=w.canonical_revision or None,
        region=w.locality.region or None,
        zone=w.locality.zone or None,
    )


def from_gateway(request: ConnectRequest, network: str) -> bool:
    """ztunnel's gateway check: the inner CONNECT of a double-HBONE tunnel names its origin
    network (``x-forwarded-network``); another network than ours means the peer address is
    the east-west gateway's, not the client's."""
    origin = request.forwarded_network
    return origin is not None and origin.lower() != network.lower()


class _InboundConnection(HboneProtocol):
    """Server-side HBONE connection that checks the client certificate first."""

    def __init__(self, server: InboundServer) -> None:
        super().__init__(
            Role.SERVER, server.settings, on_request=server._on_request, label="inbound"
        )
        self.server = server
        self.peer: SocketAddr | None = None
        self.local: SocketAddr | None = None  # our :15008, the access log's dst.addr
        self.peer_identity: str | None = None  # the verified client's SPIFFE id
        self.revocation: RevocationHandle | None = None  # tracked for CRL_PATH
        self.pending: dict[int, asyncio.Task[None]] = {}  # streams being set up, by id

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        peer = transport.get_extra_info("peername")
        ssl_object = transport.get_extra_info("ssl_object")
        try:
            self.peer = sockaddr(peer)
            self.local = sockaddr(transport.get_extra_info("sockname"))
            self.peer_identity = str(verify_client(ssl_object, self.server.trust_domain))
            if self.server.revocation is not None:
                self.revocation = self.server.revocation.admit(
                    ssl_object, reporter=Reporter.DESTINATION, close=self.abort
                )
        except (TlsVerificationError, ValueError, TypeError) as e:
            log.warning("inbound HBONE connection from %s refused: %s", peer, e)
            cast(asyncio.Transport, transport).abort()
            return
        super().connection_made(transport)
        self.server._connection_opened(self)

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self.server._connections.discard(self)
        if self.server.revocation is not None:
            self.server.revocation.untrack(self.revocation)

    def stream_abandoned(self, stream_id: int) -> bool:
        task = self.pending.pop(stream_id, None)
        if task is None:
            return False
        task.cancel()
        self.server.streams_abandoned += 1
        limited_log.info(
            "abandoned",
            "inbound HBONE stream cancelled by %s before it was answered (%d so far)",
            self.peer,
            self.server.streams_abandoned,
        )
        return True


class InboundServer(ProxyServer):
    """The :15008 listener of one pod."""

    def __init__(
        self,
        inputs: ProxyInputs,
        pod: PodInputs,
        *,
        settings: HboneSettings | None = None,
        handshake_timeout_s: float = TLS_HANDSHAKE_TIMEOUT_S,
        connect_timeout_s: float = CONNECT_TIMEOUT_S,
        certificate_refresh_s: float = CERTIFICATE_REFRESH_S,
    ) -> None:
        super().__init__("inbound", inputs, pod)
        self.state = inputs.state
        self.certificates = inputs.certificates
        self.settings = settings or hbone_settings(Role.SERVER, inputs.config)
        self.trust_domain = pod.workload.trust_domain
        self.handshake_timeout_s = handshake_timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.certificate_refresh_s = certificate_refresh_s
        self.demand = inputs.demand
        self.revocation = inputs.revocation
        self._connections: set[_InboundConnection] = set()
        self._context: ssl.SSLContext | None = None
        self._context_checked = 0.0
        self._refreshing = False
        self.streams_abandoned = 0  # streams reset or dropped by the peer before our answer

    # ------------------------------------------------------------------ lifecycle

    async def _listen(self, listener: socket.socket) -> asyncio.AbstractServer:
        ctx = await self.certificates.server_context(self.identity)
        self._use_context(ctx)
        loop = asyncio.get_running_loop()
        return await loop.create_server(
            lambda: _InboundConnection(self),
            sock=listener,
            backlog=LISTEN_BACKLOG,
            ssl=ctx,
            ssl_handshake_timeout=self.handshake_timeout_s,
        )

    def _draining(self) -> None:
        for conn in list(self._connections):
            conn.drain()  # GOAWAY: no new streams, the open ones finish

    def _drained(self) -> None:
        for conn in list(self._connections):
            conn.close("server stopped")

    @property
    def connections(self) -> int:
        return len(self._connections)

    # ------------------------------------------------------------------ certificates

    def _use_context(self, ctx: ssl.SSLContext) -> None:
        # New handshakes switch to the newest context (rotated certificate) via the SNI hook,
        # which OpenSSL calls for every ClientHello, SNI or not.
        self._context = ctx
        ctx.sni_callback = self._pick_context
        self._context_checked = time.monotonic()

    def _pick_context(self, sslobj: ssl.SSLObject, _name: str | None, ctx: ssl.SSLContext) -> None:
        current = self._context
        if current is not None and current is not ctx:
            sslobj.context = current
        return None

    def _connection_opened(self, conn: _InboundConnection) -> None:
        self._connections.add(conn)
        if (
            not self._refreshing
            and time.monotonic() - self._context_checked >= self.certificate_refresh_s
        ):
            self._refreshing = True
            self.tracker.spawn(self._refresh_context())

    async def _refresh_context(self) -> None:
        try:
            ctx = await self.certificates.server_context(self.identity)
            if ctx is not self._context:
                self._use_context(ctx)
            self._context_checked = time.monotonic()
        finally:
            self._refreshing = False
        self.streams_abandoned = 0  # streams reset or dropped by the peer before our answer

    # ------------------------------------------------------------------ streams

    def _on_request(self, proto: HboneProtocol, ev: TunnelRequested) -> None:
        assert isinstance(proto, _InboundConnection)
        try:
            request = self._parse(ev)
        except InboundRefused as e:
            self._refuse(proto, ev, None, e)
            return
        unknown = self._unknown_target(request.authority)
        if unknown is not None and self.demand is not None:
            self.tracker.spawn(self._fetch_then_admit(proto, ev, request, unknown))
            return
        self._admit(proto, ev, request)

    def _unknown_target(self, authority: Authority) -> NetworkAddress | None:
        """A target IP that is not this pod's and that the state does not know: ztunnel asks
        istiod for it (``XDS_ON_DEMAND``) before the waypoint check."""
        w = self.state.workload(self.workload.uid) or self.workload
        ip = authority.ip
        if ip is None or ip in w.workload_ips or w.application_tunnel is not None:
            return None
        address = NetworkAddress(self.config.network, ip)
        return address if self.state.find_address(address) is None else None

    async def _fetch_then_admit(
        self,
        proto: _InboundConnection,
        ev: TunnelRequested,
        request: ConnectRequest,
        address: NetworkAddress,
    ) -> None:
        assert self.demand is not None
        await self.demand(str(address))  # returns once answered, or on its timeout
        if proto.is_open:
            self._admit(proto, ev, request)

    def _admit(
        self, proto: _InboundConnection, ev: TunnelRequested, request: ConnectRequest
    ) -> None:
        sid = ev.stream_id
        record: ConnectionRecord | None = None
        try:
            target, tunnel = self._resolve(request.authority, proto.local)
            record = self._record(proto, request, target)
            authorized = self._authorize(proto, target)
        except InboundRefused as e:
            self._refuse(proto, ev, record, e)
            return
        task = self.tracker.spawn(
            self._serve_stream(proto, sid, record, target, authorized, tunnel)
        )
        proto.pending[sid] = task
        task.add_done_callback(lambda _: proto.pending.pop(sid, None))

    def _refuse(
        self,
        proto: _InboundConnection,
        ev: TunnelRequested,
        record: ConnectionRecord | None,
        e: InboundRefused,
    ) -> None:
        log.info(
            "inbound HBONE request refused (%d): %s",
            e.status,
            e.reason,
            extra={"fields": {"src": proto.peer, "authority": ev.authority}},
        )
        proto.reject(ev.stream_id, e.status)
        self._report_refused(proto, record, e)

    def _record(
        self, proto: _InboundConnection, request: ConnectRequest, target: SocketAddr
    ) -> ConnectionRecord:
        assert proto.peer is not None
        return ConnectionRecord(
            direction=Direction.INBOUND,
            src=proto.peer,
            dst=target,
            src_identity=proto.peer_identity,
            dst_identity=str(self.identity),
            dst_workload=self.workload,
            dst_service=request.forwarded.host if request.forwarded else None,
            dst_addr=proto.local,
            hbone_addr=str(request.authority),
            trace_id=(request.traceparent or new_traceparent(self.inputs.rng)).trace_id,
            src_baggage=request.baggage if self.config.enable_response_baggage else None,
            from_gateway=from_gateway(request, self.config.network),
        )

    def _report_refused(
        self, proto: _InboundConnection, record: ConnectionRecord | None, e: InboundRefused
    ) -> None:
        if isinstance(e, PolicyDenied) and record is not None:
            self.telemetry.connection_failed(
                record,
                error=f"connection closed due to policy rejection: {e.reason}",
                flags=ResponseFlags.DENY,
            )
        elif proto.peer is not None and proto.local is not None:
            # Refused before there was enough to say about it (ztunnel's early deny).
            self.telemetry.connection_rejected(
                direction=Direction.INBOUND, src=proto.peer, dst=proto.local, error=e.reason
            )

    def _parse(self, ev: TunnelRequested) -> ConnectRequest:
        try:
            return parse_connect_request(ev.method, ev.authority, ev.headers)
        except (BadConnectRequest, InvalidHeader) as e:
            raise BadRequest(str(e)) from None

    def _resolve(
        self, authority: Authority, local: SocketAddr | None
    ) -> tuple[SocketAddr, TunnelRequest | None]:
        """Authority -> (pod IP, target port) as ztunnel validates it, and what the pod's
        application tunnel (if any) is to be told about the target."""
        w = self.state.workload(self.workload.uid) or self.workload
        ip = authority.ip
        port = authority.port
        svc: Service | None = None
        if ip is not None:
            if ip in w.workload_ips:
                target_ip: IPAddress = ip
            else:
                target_ip = self._foreign_target(w, authority, ip, local)
        else:
            host = str(authority.host)
            svc = self.state.service_by_hostname(host, prefer_namespace=w.namespace)
            if svc is None or svc.namespace != w.namespace:
                raise BadRequest(f"{host} is not a service in namespace {w.namespace}")
            mapped = svc.ports.get(port)
            if mapped is None:
                raise UpstreamUnavailable(f"service {host} has no port {port}")
            if mapped == 0:
                mapped = w.services.get(svc.key, {}).get(port, 0)
            if not mapped:
                raise UpstreamUnavailable(f"this pod does not serve port {port} of {host}")
            if not w.workload_ips:
                raise UpstreamUnavailable(f"pod {w.name}.{w.namespace} has no IP")
            target_ip = w.workload_ips[0]
            port = mapped
        if port in ILLEGAL_PORTS:
            raise SelfCall(f"port {port} is the proxy's own port; refusing a call to itself")
        try:
            tunnel = tunnel_request(
                w, target_ip=ip, port=authority.port, service=svc, network=self.config.network
            )
        except AppTunnelError as e:
            raise UpstreamUnavailable(str(e)) from None
        if w.application_tunnel is not None and w.application_tunnel.port:
            port = w.application_tunnel.port
            if port in ILLEGAL_PORTS:
                raise SelfCall(
                    f"the application tunnel of {w.name}.{w.namespace} names port {port}, one"
                    " of the proxy's own ports; fix the workload's applicationTunnel.port"
                )
        return (target_ip, port), tunnel

    def _foreign_target(
        self, w: Workload, authority: Authority, ip: IPAddress, local: SocketAddr | None
    ) -> IPAddress:
        """The pod IP that serves a request for another IP, or ``BadRequest``."""
        here = local[0] if local is not None and local[0] in w.workload_ips else None
        if here is None:
            here = next((a for a in w.workload_ips if a.version == ip.version), None)
        if here is None:
            raise BadRequest(f"{authority} is not an address of this pod ({w.name}.{w.namespace})")
        if w.application_tunnel is not None:
            return here  # the tunnel tells the app the real target
        if is_waypoint_of(self.state, NetworkAddress(self.config.network, ip), w, here):
            return here
        raise BadRequest(
            f"{authority} is not an address of this pod ({w.name}.{w.namespace}), and this"
            " pod is not the waypoint of the workload or service at that address"
        )

    def _authorize(self, proto: _InboundConnection, target: SocketAddr) -> ConnectionInfo:
        assert proto.peer is not None
        conn = ConnectionInfo(
            src_ip=proto.peer[0],
            src_port=proto.peer[1],
            dst_ip=target[0],
            dst_port=target[1],
            src_identity=proto.peer_identity,
            dst_network=self.config.network,
        )
        decision = self.authorizer.check(conn)
        if not decision.allowed:
            raise PolicyDenied(f"{conn}: {decision.reason}")
        return conn

    async def _serve_stream(
        self,
        proto: _InboundConnection,
        sid: int,
        record: ConnectionRecord,
        target: SocketAddr,
        authorized: ConnectionInfo,
        tunnel: TunnelRequest | None,
    ) -> None:
        assert proto.peer is not None
        source, dial = upstream_route(
            target,
            tunnel,
            peer_ip=proto.peer[0],
            orig_src=bool(self.config.enable_orig_src),
            localhost_app_tunnel=self.config.localhost_app_tunnel,
        )
        try:
            preface = b""
            if tunnel is not None and tunnel.protocol is AppTunnelProtocol.PROXY:
                preface = proxy_v2_header(proto.peer, tunnel.target, proto.peer_identity)
            tcp = await connect_tcp(
                self.sockets, dial, source=source, timeout_s=self.connect_timeout_s,
                preface=preface,
            )  # fmt: skip
        except (UpstreamConnectError, AppTunnelError, OSError) as e:
            log.info("inbound upstream unavailable (503): %s", e)
            if proto.is_open:
                proto.reject(sid, UpstreamUnavailable.status)
            error, flags = setup_failure(e)
            self.telemetry.connection_failed(record, error=error, flags=flags)
            return
        kernel = (
            self.inputs.kernel_splice.claim(proto.peer, proto.local, sid, tcp)
            if self.inputs.kernel_splice is not None and proto.local is not None
            else None
        )
        splice = HboneSplice(tcp)
        splice.bind(proto, sid)
        headers = (
            response_headers(baggage=workload_baggage(self.workload))
            if self.config.enable_response_baggage
            else []
        )
        try:
            proto.accept(sid, splice, headers)
        except HboneError as e:
            log.debug("inbound stream %d went away before it was accepted: %s", sid, e)
            tcp.reset()
            if kernel is not None:
                kernel.abort(f"stream went away before it was accepted: {e}")
            self.telemetry.connection_failed(
                record,
                error=f"stream went away before it was accepted: {e}",
                flags=ResponseFlags.CONNECT,
            )
            return
        if splice.done.done():  # reset while we were connecting
            error = splice.done.result().error or "stream closed before it was spliced"
            if kernel is not None:
                kernel.abort(error)
            self.telemetry.connection_failed(record, error=error, flags=ResponseFlags.CONNECT)
            return
        if kernel is not None:
            await self._run_kernel_splice(kernel, splice, record, authorized)
            return
        splice.start()
        report_splice(self.telemetry, record, splice, reads_source=False)
        # Re-checked on every policy change; a denial aborts the splice (RST both ways).
        with (
            tracked(
                self.conntrack,
                authorized,
                self.workload,
                splice.abort,
                dest_service=record.dst_service,
            ),
            self.tracker.tracking(splice),
        ):
            result = await splice.done
        if result.error is not None:
            log.debug("inbound stream %d closed: %s", sid, result.error)

    async def _run_kernel_splice(
        self,
        kernel: KernelSplice,
        splice: HboneSplice,
        record: ConnectionRecord,
        authorized: ConnectionInfo,
    ) -> None:
        """A same-node connection whose bytes the kernel carries (``proxy.kernel_splice``):
        reported with the kernel's counters, re-checked on policy changes like any other."""
        report_splice(self.telemetry, record, kernel, reads_source=True)
        with (
            tracked(
                self.conntrack,
                authorized,
                self.workload,
                kernel.abort,
                dest_service=record.dst_service,
            ),
            self.tracker.tracking(kernel),
        ):
            try:
                await kernel.done
            finally:
                splice.abort("spliced in the kernel")
