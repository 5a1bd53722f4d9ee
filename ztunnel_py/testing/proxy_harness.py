"""A client pod and a server pod on loopback addresses, with real TLS, for proxy tests.

Each ``Mesh`` takes a fresh 127.x.y.0/24 range, so tests never collide on ports: the client
pod is .1 (outbound listener on an ephemeral port), the server pod .2 (HBONE on :15008, app
servers on ordinary ports). Certificates come from a throw-away CA (``testing.pki``).
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import itertools
import os
import random
import socket
import ssl
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace

import h2.config
import h2.connection
import h2.events

from ztunnel_py.config import Config, RootCert, RootCertKind
from ztunnel_py.hbone.connection import HboneSettings
from ztunnel_py.identity.certificate import WorkloadCertificate
from ztunnel_py.identity.spiffe import Identity
from ztunnel_py.identity.tls import NO_SNI, client_context
from ztunnel_py.proxy.authorization import Authorizer, PermitAll
from ztunnel_py.proxy.certificates import FetchedCertificates
from ztunnel_py.proxy.conntrack import ConnectionTracker
from ztunnel_py.proxy.inbound import InboundServer
from ztunnel_py.proxy.inputs import PodInputs, ProxyInputs
from ztunnel_py.proxy.kernel_splice import KernelSplicer
from ztunnel_py.proxy.outbound import OutboundServer
from ztunnel_py.proxy.pod import pod_pool
from ztunnel_py.proxy.pool import HbonePool
from ztunnel_py.proxy.revocation import CrlManager
from ztunnel_py.proxy.sockopt import PodSocketFactory
from ztunnel_py.state.model import InboundProtocol, IPAddress, Service, SocketAddr, Workload
from ztunnel_py.state.store import ProxyState, UpdateBatch
from ztunnel_py.telemetry.connections import NoTelemetry, TelemetrySink
from ztunnel_py.testing.pki import CertificateAuthority

_ranges = itertools.count(random.Random(os.getpid()).randrange(1, 200) * 250)
CLIENT_ID = Identity("cluster.local", "default", "client")
SERVER_ID = Identity("cluster.local", "default", "server")


def make_config(**kw: object) -> Config:
    root = RootCert(RootCertKind.FILE, "/nonexistent")
    return Config(xds_address=None, ca_address=None, xds_root_cert=root, ca_root_cert=root, **kw)  # type: ignore[arg-type]


class Pki:
    def __init__(self) -> None:
        self.ca = CertificateAuthority.create()
        self._certs: dict[Identity, WorkloadCertificate] = {}

    def cert(self, identity: Identity) -> WorkloadCertificate:
        if identity not in self._certs:
            issued = self.ca.issue_workload(str(identity))
            self._certs[identity] = WorkloadCertificate.from_ca_response(
                identity, issued.key_pem, [issued.cert_pem.decode(), self.ca.root_pem.decode()]
            )
        return self._certs[identity]

    async def fetch(self, identity: Identity) -> WorkloadCertificate:
        return self.cert(identity)


@dataclass
class FixedDestination:
    """The original destination of every connection accepted on the outbound listener."""

    target: SocketAddr

    def original_destination(self, sock: socket.socket) -> SocketAddr:
        return self.target


def pod(name: str, ip: IPAddress, sa: str, **kw: object) -> Workload:
    return Workload(
        uid=f"Kubernetes//Pod/default/{name}",
        name=name,
        namespace="default",
        service_account=sa,
        workload_ips=(ip,),
        protocol=InboundProtocol.HBONE,
        **kw,  # type: ignore[arg-type]
    )


@dataclass
class Mesh:
    """Client pod + server pod with the proxy servers running; ``stop()`` tears down."""

    base: str
    config: Config
    pki: Pki
    state: ProxyState
    client: Workload
    server: Workload
    pool: HbonePool
    inbound: InboundServer
    outbound: OutboundServer
    outbound_addr: SocketAddr
    destination: FixedDestination
    #: What the client pod's proxy was built from; ``dataclasses.replace`` it for more servers.
    inputs: ProxyInputs
    apps: list[asyncio.AbstractServer] = field(default_factory=list)

    @property
    def client_ip(self) -> IPAddress:
        return self.client.workload_ips[0]

    @property
    def server_ip(self) -> IPAddress:
        return self.server.workload_ips[0]

    async def dial(self, target_port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """An application connection through the outbound proxy to the server pod's port."""
        self.destination.target = (self.server_ip, target_port)
        return await asyncio.open_connection(str(self.outbound_addr[0]), self.outbound_addr[1])

    async def serve_app(
        self, handler: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
    ) -> int:
        server = await asyncio.start_server(handler, str(self.server_ip), 0, backlog=4096)
        self.apps.append(server)
        return int(server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        await self.outbound.stop(1.0)
        await self.inbound.stop(1.0)
        await self.pool.close()
        for app in self.apps:
            app.close()


async def start_mesh(
    *,
    authorizer: Authorizer | None = None,
    server_settings: HboneSettings | None = None,
    max_streams_per_connection: int = 100,
    unused_release_timeout_s: float = 300.0,
    handshake_timeout_s: float = 10.0,
    services: tuple[Service, ...] = (),
    server_services: dict[str, dict[int, int]] | None = None,
    telemetry: TelemetrySink | None = None,
    server_telemetry: TelemetrySink | None = None,
    certificate_refresh_s: float = 30.0,
    conntrack: ConnectionTracker | None = None,
    state: ProxyState | None = None,
    revocation: CrlManager | None = None,
    kernel_splice: KernelSplicer | None = None,
) -> Mesh:
    """``telemetry`` serves both pods unless ``server_telemetry`` is given for the server's
    inbound side (two nodes, each with its own metrics). ``state`` lets a test build objects
    on the mesh state (a telemetry sink) before the mesh starts; the pods are added to it.
    ``kernel_splice``: both pods are on this node, and their connections spliced by it."""
    n = next(_ranges)
    base = f"127.{100 + n // 250 % 100}.{n % 250}"
    client_ip = ipaddress.ip_address(f"{base}.1")
    server_ip = ipaddress.ip_address(f"{base}.2")
    node = "node-a" if kernel_splice is not None else ""
    config = make_config(
        pool_max_streams_per_connection=max_streams_per_connection,
        pool_unused_release_timeout_s=unused_release_timeout_s,
        node_name=node or None,
    )
    pki = Pki()
    state = state if state is not None else ProxyState()
    client = pod("client", client_ip, "client", node=node)
    server = pod("server", server_ip, "server", services=server_services or {}, node=node)
    state.apply(UpdateBatch(workloads=(client, server), services=services))
    destination = FixedDestination((server_ip, 0))
    inputs = ProxyInputs(
        config=config,
        state=state,
        certificates=FetchedCertificates(pki.fetch),
        original_destination=destination,
        telemetry=telemetry if telemetry is not None else NoTelemetry(),
        conntrack=conntrack,
        rng=random.Random(1),
        revocation=revocation,
        kernel_splice=kernel_splice,
    )
    sockets = PodSocketFactory(config, mark=False)
    pool = pod_pool(inputs, sockets)
    server_inputs = inputs
    if server_telemetry is not None:
        server_inputs = replace(inputs, telemetry=server_telemetry)
    inbound = InboundServer(
        server_inputs,
        PodInputs(
            workload=server, sockets=sockets, pool=pool, authorizer=authorizer or PermitAll()
        ),
        settings=server_settings,
        handshake_timeout_s=handshake_timeout_s,
        certificate_refresh_s=certificate_refresh_s,
    )
    hbone_listener = listen(server_ip, 15008)
    await inbound.start(hbone_listener)
    outbound = OutboundServer(inputs, PodInputs(workload=client, sockets=sockets, pool=pool))
    out_listener = listen(client_ip, 0)
    await outbound.start(out_listener)
    return Mesh(
        base=base,
        config=config,
        pki=pki,
        state=state,
        client=client,
        server=server,
        pool=pool,
        inbound=inbound,
        outbound=outbound,
        outbound_addr=(client_ip, out_listener.getsockname()[1]),
        destination=destination,
        inputs=inputs,
    )


def listen(ip: IPAddress, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((str(ip), port))
    sock.listen(1024)
    sock.setblocking(False)
    return sock


# ----------------------------------------------------------------------------- applications


def pattern(n: int, seed: int = 0) -> bytes:
    """Deterministic, non-repeating-looking bytes (checksums catch reordering)."""
    out = bytearray()
    counter = 0
    while len(out) < n:
        out += hashlib.sha256(struct.pack(">QQ", seed, counter)).digest() * 64
        counter += 1
    return bytes(out[:n])


async def echo_app(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.write_eof()
        await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


async def bulk_app(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """``UP <n>``: read n bytes, answer their sha256. ``DOWN <n> <seed>``: send pattern(n)."""
    try:
        line = (await reader.readline()).decode().split()
        if line[0] == "UP":
            n = int(line[1])
            digest = hashlib.sha256()
            left = n
            while left:
                chunk = await reader.read(min(left, 1 << 20))
                if not chunk:
                    break
                digest.update(chunk)
                left -= len(chunk)
            writer.write(digest.hexdigest().encode() + b"\n")
        else:
            n, seed = int(line[1]), int(line[2])
            data = pattern(n, seed)
            for i in range(0, n, 1 << 20):
                writer.write(data[i : i + (1 << 20)])
                await writer.drain()
        writer.write_eof()
        await writer.drain()
        await reader.read()
    except ConnectionError:
        pass
    finally:
        writer.close()


# ----------------------------------------------------------------------------- raw HBONE client


@dataclass
class RawAnswer:
    status: int | None
    terminated: bool  # the server sent GOAWAY / closed the connection


async def raw_hbone(
    mesh: Mesh,
    requests: list[list[tuple[str, str]]],
    *,
    identity: Identity = CLIENT_ID,
    ctx: ssl.SSLContext | None = None,
    address: SocketAddr | None = None,
) -> list[RawAnswer]:
    """Send raw HTTP/2 requests over mTLS to ``address`` (default: the server pod's :15008)
    and collect the answers."""
    ctx = ctx or client_context(mesh.pki.cert(identity))
    ip, port = address or (mesh.server_ip, 15008)
    reader, writer = await asyncio.open_connection(str(ip), port, ssl=ctx, server_hostname=NO_SNI)
    conn = h2.connection.H2Connection(
        h2.config.H2Configuration(client_side=True, validate_outbound_headers=False)
    )
    conn.initiate_connection()
    sids = []
    for headers in requests:
        sid = conn.get_next_available_stream_id()
        conn.send_headers(sid, headers)
        sids.append(sid)
    writer.write(conn.data_to_send())
    answers: dict[int, RawAnswer] = {}
    terminated = False
    try:
        async with asyncio.timeout(5):
            while len(answers) < len(sids) and not terminated:
                data = await reader.read(65536)
                if not data:
                    terminated = True
                    break
                for ev in conn.receive_data(data):
                    if isinstance(ev, h2.events.ResponseReceived):
                        status = dict(ev.headers)[b":status"]
                        answers[ev.stream_id] = RawAnswer(int(status), False)
                    elif isinstance(ev, h2.events.ConnectionTerminated):
                        terminated = True
                    elif isinstance(ev, h2.events.StreamReset) and ev.stream_id not in answers:
                        answers[ev.stream_id] = RawAnswer(None, False)
                writer.write(conn.data_to_send())
    except ConnectionError:
        terminated = True
    writer.close()
    return [answers.get(sid, RawAnswer(None, terminated)) for sid in sids]


def connect_request(authority: str, method: str = "CONNECT") -> list[tuple[str, str]]:
    return [(":method", method), (":authority", authority)]
