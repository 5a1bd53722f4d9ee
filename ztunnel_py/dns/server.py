"""The DNS proxy's UDP and TCP servers for one client (a pod, or the dedicated workload).

Each query is answered from the mesh (``MeshResolver``) when it names a mesh service, and
forwarded upstream otherwise; every reply goes back on the transport it came in on. Bad input
never stops the server: bytes that do not parse get FORMERR (or nothing), a response sent as
a query FORMERR, another opcode NOTIMP, an unknown client SERVFAIL. Memory is bounded: at most
``max_inflight`` forwarded queries at a time (more UDP queries are dropped, as a busy resolver
does, and the client retries; a TCP client gets SERVFAIL), at most ``max_tcp_connections``
TCP clients, each idle for at most ``tcp_idle_timeout_s`` and sending one query at a time.
Only the client itself (loopback, or one of its workload addresses) is answered: the proxy is
never an open resolver for anything outside the pod.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import dns.rcode

from ztunnel_py.dns.forwarder import ForwardError, UpstreamForwarder
from ztunnel_py.dns.messages import (
    Protocol,
    Query,
    Refusal,
    answer_count,
    error_response,
    mesh_response,
    parse_query,
    readdressed,
    relay_response,
    render,
)
from ztunnel_py.dns.resolver import MeshResolver
from ztunnel_py.dns.telemetry import DnsMetrics, dns_labels, dns_log_enabled, log_dns_request
from ztunnel_py.state.model import Workload

log = logging.getLogger(__name__)

MAX_INFLIGHT = 100
MAX_TCP_CONNECTIONS = 32
TCP_IDLE_TIMEOUT_S = 5.0  # ztunnel's DEFAULT_TCP_REQUEST_TIMEOUT
ANSWER_CACHE_SIZE = 256  # rendered single-address mesh answers per pod, until the state changes


@dataclass(frozen=True, slots=True)
class _CachedAnswer:
    reply: bytes
    query_type: str
    domain: str
    result: str
    endpoints: int


@dataclass(frozen=True, slots=True)
class _Forward:
    query: Query
    client: Workload


class DnsServer:
    def __init__(
        self,
        *,
        resolver: MeshResolver,
        client: Callable[[], Workload | None],
        forwarder: UpstreamForwarder,
        metrics: DnsMetrics | None = None,
        max_inflight: int = MAX_INFLIGHT,
        max_tcp_connections: int = MAX_TCP_CONNECTIONS,
        tcp_idle_timeout_s: float = TCP_IDLE_TIMEOUT_S,
    ) -> None:
        self.resolver = resolver
        self._client = client
        self.forwarder = forwarder
        self.metrics = metrics
        self.max_inflight = max_inflight
        self.max_tcp_connections = max_tcp_connections
        self.tcp_idle_timeout_s = tcp_idle_timeout_s
        self.inflight = 0
        self.dropped = 0  # UDP queries dropped because too many were in flight
        self._tasks: set[asyncio.Task[Any]] = set()
        self._transports: list[asyncio.DatagramTransport] = []
        self._servers: list[asyncio.Server] = []
        self._tcp_writers: set[asyncio.StreamWriter] = set()
        self._answers: dict[tuple[bytes, str], _CachedAnswer] = {}
        self._answers_generation = -1

    # ------------------------------------------------------------------ lifecycle

    async def start(self, sockets: Sequence[socket.socket]) -> None:
        """Serve already-bound sockets: UDP ones as datagram endpoints, TCP ones listening."""
        loop = asyncio.get_running_loop()
        for sock in sockets:
            if sock.type == socket.SOCK_DGRAM:
                transport, _ = await loop.create_datagram_endpoint(
                    lambda: _UdpProtocol(self), sock=sock
                )
                self._transports.append(transport)
            else:
                self._servers.append(await asyncio.start_server(self._tcp_client, sock=sock))

    async def stop(self) -> None:
        for transport in self._transports:
            transport.close()
        for server in self._servers:
            server.close()
        for writer in list(self._tcp_writers):
            writer.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for server in self._servers:
            with contextlib.suppress(Exception):
                await server.wait_closed()
        self._transports.clear()
        self._servers.clear()

    @property
    def tcp_clients(self) -> int:
        return len(self._tcp_writers)

    # ------------------------------------------------------------------ one query

    def allowed(self, peer_ip: str) -> bool:
        """Loopback or the client's own addresses: nobody else may use this resolver."""
        try:
            ip = ipaddress.ip_address(peer_ip.split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        if ip.is_loopback:
            return True
        client = self._client()
        return client is not None and ip in client.workload_ips

    def answer_locally(self, wire: bytes, protocol: str) -> bytes | _Forward | None:
        """Reply bytes, ``None`` (drop), or a query that must go upstream."""
        cached = self._cached(wire, protocol)
        if cached is not None:
            return cached
        parsed = parse_query(wire)
        if isinstance(parsed, Refusal):
            log.debug("dns: %s", parsed.reason)
            return parsed.wire
        client = self._client()
        if client is None:
            log.debug("dns: unknown source")
            self._count_request(parsed, protocol, None)
            return render(error_response(parsed.message, dns.rcode.SERVFAIL), parsed, protocol)
        answer = self.resolver.resolve(client, parsed.labels, parsed.rdtype)
        if answer is None:
            return _Forward(parsed, client)
        entry = _CachedAnswer(
            render(mesh_response(parsed, answer), parsed, protocol),
            parsed.type_text,
            parsed.domain_text,
            answer.result,
            answer.addresses,
        )
        if answer.addresses <= 1 and len(self._answers) < ANSWER_CACHE_SIZE:
            # Several addresses are shuffled per query (as ztunnel does): never cached.
            self._answers[(wire[2:], protocol)] = entry
        return self._answered(entry, protocol, client)

    def _cached(self, wire: bytes, protocol: str) -> bytes | None:
        """A mesh answer rendered before for the very same query bytes (but the id), while
        the mesh state is unchanged: dnspython's parse and render are most of a query's cost."""
        generation = self.resolver.state.generation
        if generation != self._answers_generation:
            self._answers.clear()
            self._answers_generation = generation
            return None
        entry = self._answers.get((wire[2:], protocol))
        if entry is None:
            return None
        client = self._client()
        if client is None:
            return None
        return wire[:2] + self._answered(entry, protocol, client)[2:]

    def _answered(self, entry: _CachedAnswer, protocol: str, client: Workload) -> bytes:
        if self.metrics is not None:
            labels = dns_labels(entry.query_type, protocol, client)
            self.metrics.requests.labels(*labels).inc()
        log_dns_request(
            source=client,
            query_type=entry.query_type,
            domain=entry.domain,
            result=entry.result,
            endpoints=entry.endpoints,
        )
        return entry.reply

    def reserve(self) -> bool:
        """Take one of the ``max_inflight`` forwarding slots (``forward`` gives it back)."""
        if self.inflight >= self.max_inflight:
            return False
        self.inflight += 1
        return True

    async def forward(self, job: _Forward, protocol: str) -> bytes:
        """Forward a query that holds a slot from ``reserve``."""
        query, client = job.query, job.client
        labels = dns_labels(query.type_text, protocol, client)
        self._count_request(query, protocol, client)
        if self.metrics is not None:
            self.metrics.upstream_requests.labels(*labels).inc()
        loop = asyncio.get_running_loop()
        start = loop.time()
        try:
            upstream = await self.forwarder.forward(query.message, query.wire)
        except ForwardError as e:
            if self.metrics is not None:
                self.metrics.upstream_failures.labels(*labels).inc()
            log_dns_request(
                source=client,
                query_type=query.type_text,
                domain=query.domain_text,
                result=f"forwarding failed ({e})",
                endpoints=0,
            )
            response = error_response(query.message, dns.rcode.SERVFAIL)
        else:
            log_dns_request(
                source=client,
                query_type=query.type_text,
                domain=query.domain_text,
                result="forwarded",
                endpoints=answer_count(upstream.parsed()) if dns_log_enabled() else 0,
            )
            if protocol == Protocol.TCP or len(upstream.wire) <= query.udp_payload():
                return readdressed(upstream.wire, query)
            response = relay_response(query, upstream.parsed())  # too big for UDP: TC
        finally:
            self.inflight -= 1
            if self.metrics is not None:
                self.metrics.upstream_duration.labels(*labels).observe(loop.time() - start)
        return render(response, query, protocol)

    async def handle(self, wire: bytes, protocol: str) -> bytes | None:
        """One query end to end (the TCP path, and tests)."""
        local = self.answer_locally(wire, protocol)
        if not isinstance(local, _Forward):
            return local
        if not self.reserve():
            return render(
                error_response(local.query.message, dns.rcode.SERVFAIL), local.query, protocol
            )
        return await self.forward(local, protocol)

    def _count_request(self, query: Query, protocol: str, client: Workload | None) -> None:
        if self.metrics is not None:
            self.metrics.requests.labels(*dns_labels(query.type_text, protocol, client)).inc()

    # ------------------------------------------------------------------ transports

    def spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _tcp_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        if len(self._tcp_writers) >= self.max_tcp_connections or not (
            peer and self.allowed(str(peer[0]))
        ):
            writer.close()
            return
        self._tcp_writers.add(writer)
        try:
            while True:
                async with asyncio.timeout(self.tcp_idle_timeout_s):
                    (length,) = struct.unpack("!H", await reader.readexactly(2))
                    wire = await reader.readexactly(length)
                reply = await self.handle(wire, Protocol.TCP)
                if reply is None:
                    break  # nothing sensible to say: close, as for a framing error
                writer.write(struct.pack("!H", len(reply)) + reply)
                await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self._tcp_writers.discard(writer)
            writer.close()


class _UdpProtocol(asyncio.DatagramProtocol):
    def __init__(self, server: DnsServer) -> None:
        self.server = server
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's UDP transport quacks like asyncio.DatagramTransport without subclassing it
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        server = self.server
        if not server.allowed(str(addr[0])):
            return
        local = server.answer_locally(data, Protocol.UDP)
        if isinstance(local, _Forward):
            if not server.reserve():
                server.dropped += 1
                log.debug("dns: %d queries in flight, dropping one", server.inflight)
                return
            server.spawn(self._forward(local, addr))
        elif local is not None:
            self._send(local, addr)

    async def _forward(self, job: _Forward, addr: tuple[Any, ...]) -> None:
        self._send(await self.server.forward(job, Protocol.UDP), addr)

    def _send(self, reply: bytes, addr: tuple[Any, ...]) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.sendto(reply, addr)

    def error_received(self, exc: Exception) -> None:
        log.debug("dns: udp error %s", exc)
