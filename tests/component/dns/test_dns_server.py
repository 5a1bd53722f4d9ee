"""The DNS server and forwarder on loopback sockets: bounds, bad input, a misbehaving upstream.

The upstream here is a scripted UDP peer (it must misbehave on purpose: answer with the wrong
id, or never); the namespaced end-to-end tests use a real dnsmasq.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import struct
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import dns.message
import dns.rcode
import dns.rrset
import pytest
import pytest_asyncio
from prometheus_client import CollectorRegistry

from ztunnel_py.config import DnsProxyAddress
from ztunnel_py.dns.forwarder import UpstreamForwarder
from ztunnel_py.dns.ondemand import OnDemandResolver
from ztunnel_py.dns.proxy import bind_dns_sockets
from ztunnel_py.dns.resolvconf import ResolvConf
from ztunnel_py.dns.resolver import MeshResolver
from ztunnel_py.dns.server import DnsServer
from ztunnel_py.dns.telemetry import OnDemandDnsMetrics
from ztunnel_py.state.model import NetworkAddress, Service, Workload
from ztunnel_py.state.store import ProxyState, UpdateBatch
from ztunnel_py.testing.poll import wait_until_async

CLIENT = Workload(
    uid="c", name="client", namespace="ns1", workload_ips=(ipaddress.ip_address("10.244.0.10"),)
)
WEB = Service(
    name="web",
    namespace="ns1",
    hostname="web.ns1.svc.cluster.local",
    vips=(NetworkAddress("", ipaddress.ip_address("10.96.0.7")),),
)
DUAL = Service(
    name="dual",
    namespace="ns1",
    hostname="dual.ns1.svc.cluster.local",
    vips=(
        NetworkAddress("", ipaddress.ip_address("10.96.0.8")),
        NetworkAddress("", ipaddress.ip_address("fd00:96::8")),
    ),
)


@dataclass
class Upstream(asyncio.DatagramProtocol):
    """A resolver that answers (``mode="answer"``), answers with a wrong id first
    (``"spoofed-first"``) or never answers (``"silent"``)."""

    mode: str = "answer"
    received: int = 0
    transport: asyncio.DatagramTransport | None = field(default=None, repr=False)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.received += 1
        if self.mode == "silent" or self.transport is None:
            return
        query = dns.message.from_wire(data)
        reply = dns.message.make_response(query)
        reply.answer.append(dns.rrset.from_text(query.question[0].name, 60, "IN", "A", "192.0.2.1"))
        if self.mode == "spoofed-first":
            spoofed = dns.message.make_response(query)
            spoofed.id = (query.id + 1) % 65536
            spoofed.answer.append(
                dns.rrset.from_text(query.question[0].name, 60, "IN", "A", "203.0.113.66")
            )
            self.transport.sendto(spoofed.to_wire(), addr)
        self.transport.sendto(reply.to_wire(), addr)


@dataclass
class Harness:
    server: DnsServer
    upstream: Upstream
    udp: tuple[str, int]
    tcp: tuple[str, int]

    async def udp_query(
        self, name: str, *, wait: bool = True, rdtype: str = "A"
    ) -> dns.message.Message | None:
        loop = asyncio.get_running_loop()
        family = socket.AF_INET6 if ":" in self.udp[0] else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
        sock.setblocking(False)
        try:
            sock.connect(self.udp)
            await loop.sock_sendall(sock, dns.message.make_query(name, rdtype).to_wire())
            if not wait:
                return None
            return dns.message.from_wire(await asyncio.wait_for(loop.sock_recv(sock, 65535), 10))
        finally:
            sock.close()

    async def tcp_exchange(self, wire: bytes) -> bytes:
        reader, writer = await asyncio.open_connection(*self.tcp[:2])
        try:
            writer.write(struct.pack("!H", len(wire)) + wire)
            await writer.drain()
            (length,) = struct.unpack("!H", await reader.readexactly(2))
            return await reader.readexactly(length)
        finally:
            writer.close()


@pytest_asyncio.fixture
async def make_harness() -> AsyncIterator[Callable[..., asyncio.Future[Harness]]]:
    made: list[Harness] = []
    transports: list[asyncio.DatagramTransport] = []

    async def make(
        mode: str = "answer", *, host: str = "127.0.0.1", **server_args: object
    ) -> Harness:
        """``host``: the loopback address the proxy and the upstream listen on (``::1``: IPv6)."""
        loop = asyncio.get_running_loop()
        upstream = Upstream(mode)
        transport, _ = await loop.create_datagram_endpoint(lambda: upstream, local_addr=(host, 0))
        transports.append(transport)
        port = transport.get_extra_info("sockname")[1]
        state = ProxyState()
        state.apply(UpdateBatch(services=(WEB, DUAL), workloads=(CLIENT,)))
        conf = ResolvConf(((ipaddress.ip_address(host), port),), (), 0.5, 1)

        def upstream_socket(family: int, kind: int) -> socket.socket:
            sock = socket.socket(family, kind)
            sock.setblocking(False)
            return sock

        client = server_args.pop("client", lambda: state.workload("c"))
        server = DnsServer(
            resolver=MeshResolver(state, ipv6_enabled=bool(server_args.pop("ipv6_enabled", True))),
            client=client,  # type: ignore[arg-type]
            forwarder=UpstreamForwarder(conf, upstream_socket),
            **server_args,  # type: ignore[arg-type]
        )
        sockets = bind_dns_sockets(None, DnsProxyAddress(host, 0), ipv6=False)
        udp = next(s for s in sockets if s.type == socket.SOCK_DGRAM).getsockname()
        tcp = next(s for s in sockets if s.type == socket.SOCK_STREAM).getsockname()
        await server.start(sockets)
        harness = Harness(server, upstream, udp, tcp)
        made.append(harness)
        return harness

    yield make  # type: ignore[misc]
    for harness in made:
        await harness.server.stop()
    for transport in transports:
        transport.close()


@pytest.mark.asyncio
async def test_mesh_names_and_forwarding_over_udp_and_tcp(make_harness) -> None:
    h = await make_harness()
    reply = await h.udp_query("web.ns1.svc.cluster.local.")
    assert reply is not None and [r.address for r in reply.answer[0]] == ["10.96.0.7"]
    forwarded = await h.udp_query("www.example.test.")
    assert forwarded is not None and [r.address for r in forwarded.answer[0]] == ["192.0.2.1"]
    tcp = dns.message.from_wire(
        await h.tcp_exchange(dns.message.make_query("web.ns1.", "A").to_wire())
    )
    assert [r.address for r in tcp.answer[0]] == ["10.96.0.7"]


@pytest.mark.asyncio
async def test_answers_with_the_wrong_id_are_ignored(make_harness) -> None:
    h = await make_harness("spoofed-first")
    reply = await h.udp_query("www.example.test.")
    assert reply is not None and [r.address for r in reply.answer[0]] == ["192.0.2.1"]


@pytest.mark.asyncio
async def test_unknown_client_gets_servfail(make_harness) -> None:
    h = await make_harness(client=lambda: None)
    reply = await h.udp_query("web.ns1.")
    assert reply is not None and reply.rcode() == dns.rcode.SERVFAIL
    assert h.upstream.received == 0


@pytest.mark.asyncio
async def test_in_flight_forwards_are_bounded_and_mesh_answers_go_on(make_harness) -> None:
    h = await make_harness("silent", max_inflight=3)
    for i in range(10):
        await h.udp_query(f"q{i}.example.test.", wait=False)
    await wait_until_async(lambda: h.server.dropped == 7, "7 of 10 queries dropped")
    assert h.server.inflight == 3
    # Mesh names need no slot; a TCP client is told SERVFAIL at once rather than dropped.
    reply = await h.udp_query("web.ns1.")
    assert reply is not None and reply.answer
    tcp = dns.message.from_wire(
        await h.tcp_exchange(dns.message.make_query("x.example.test.", "A").to_wire())
    )
    assert tcp.rcode() == dns.rcode.SERVFAIL
    # The silent upstream times out (0.5s, one attempt): every slot comes back.
    await wait_until_async(lambda: h.server.inflight == 0, "forwards to time out")
    assert h.upstream.received == 3


@pytest.mark.asyncio
async def test_tcp_connections_are_bounded_and_idle_ones_closed(make_harness) -> None:
    h = await make_harness(max_tcp_connections=1, tcp_idle_timeout_s=0.2)
    reader1, writer1 = await asyncio.open_connection(*h.tcp)
    await wait_until_async(lambda: h.server.tcp_clients == 1, "first client held")
    reader2, writer2 = await asyncio.open_connection(*h.tcp)
    assert await asyncio.wait_for(reader2.read(), 10) == b""  # over the bound: closed
    assert await asyncio.wait_for(reader1.read(), 10) == b""  # idle: closed
    for w in (writer1, writer2):
        w.close()


@pytest.mark.asyncio
async def test_malformed_tcp_queries(make_harness) -> None:
    h = await make_harness()
    formerr = dns.message.from_wire(await h.tcp_exchange(bytes.fromhex("123401000001") + b"\0" * 6))
    assert formerr.id == 0x1234 and formerr.rcode() == dns.rcode.FORMERR
    reader, writer = await asyncio.open_connection(*h.tcp)
    writer.write(b"\x00\x03abc")  # three bytes that are no message: closed without a word
    await writer.drain()
    assert await asyncio.wait_for(reader.read(), 10) == b""
    writer.close()
    reply = await h.udp_query("web.ns1.")
    assert reply is not None and reply.answer


def test_only_the_client_may_ask() -> None:
    state = ProxyState()
    state.apply(UpdateBatch(workloads=(CLIENT,)))
    server = DnsServer(
        resolver=MeshResolver(state),
        client=lambda: state.workload("c"),
        forwarder=UpstreamForwarder(ResolvConf(()), lambda f, k: socket.socket(f, k)),
    )
    assert server.allowed("127.0.0.1") and server.allowed("::1")
    assert server.allowed("::ffff:127.0.0.1")
    assert server.allowed("10.244.0.10")  # the pod's own address (iptables REDIRECT keeps it)
    assert not server.allowed("10.244.0.11")  # anybody else: never an open resolver
    assert not server.allowed("not-an-ip")


@pytest.mark.asyncio
async def test_repeated_mesh_answers_follow_state_changes(make_harness) -> None:
    h = await make_harness()
    first = await h.udp_query("web.ns1.")
    again = await h.udp_query("web.ns1.")
    assert first is not None and again is not None and first.id != again.id
    assert again.answer == first.answer
    # The VIP moves: the next answer says so (answers are reused only while nothing changed).
    moved = Service(
        name="web",
        namespace="ns1",
        hostname="web.ns1.svc.cluster.local",
        vips=(NetworkAddress("", ipaddress.ip_address("10.96.0.8")),),
    )
    h.server.resolver.state.apply(UpdateBatch(services=(moved,)))
    after = await h.udp_query("web.ns1.")
    assert after is not None and [r.address for r in after.answer[0]] == ["10.96.0.8"]


@pytest.mark.asyncio
@pytest.mark.parametrize("mode", ["answer", "silent"])
async def test_on_demand_dns_for_hostname_workloads(make_harness, mode: str) -> None:
    h = await make_harness(mode)
    registry = CollectorRegistry()
    resolver = OnDemandResolver(h.server.forwarder, metrics=OnDemandDnsMetrics(registry))
    if mode == "answer":
        ip = await resolver.resolve("ext.example.test", prefer_version=6, source=CLIENT)
        assert ip == ipaddress.ip_address("192.0.2.1")  # no IPv6 address: the IPv4 one
    else:
        with pytest.raises(LookupError, match=r"ext\.example\.test has no address"):
            await resolver.resolve("ext.example.test", prefer_version=4, source=CLIENT)
    labels = {"hostname": "ext.example.test", "source_workload_namespace": "ns1"}
    samples = [
        s
        for family in registry.collect()
        for s in family.samples
        if s.name == "istio_on_demand_dns_total" and labels.items() <= s.labels.items()
    ]
    assert [s.value for s in samples] == [1.0]


@pytest.mark.asyncio
@pytest.mark.parametrize("host", ["::1", "127.0.0.1"], ids=["over-ipv6", "over-ipv4"])
async def test_aaaa_answers_are_the_ipv6_vips_over_either_family(make_harness, host: str) -> None:
    h = await make_harness(host=host)
    aaaa = await h.udp_query("dual.ns1.svc.cluster.local.", rdtype="AAAA")
    assert aaaa is not None and [r.address for r in aaaa.answer[0]] == ["fd00:96::8"]
    a = await h.udp_query("dual.ns1.svc.cluster.local.", rdtype="A")
    assert a is not None and [r.address for r in a.answer[0]] == ["10.96.0.8"]
    # An IPv4-only service has no AAAA record: an empty NOERROR answer, not NXDOMAIN.
    none = await h.udp_query("web.ns1.svc.cluster.local.", rdtype="AAAA")
    assert none is not None and none.rcode() == dns.rcode.NOERROR and none.answer == []
    tcp = dns.message.from_wire(
        await h.tcp_exchange(
            dns.message.make_query("dual.ns1.svc.cluster.local.", "AAAA").to_wire()
        )
    )
    assert [r.address for r in tcp.answer[0]] == ["fd00:96::8"]
    # Names outside the mesh go to the upstream resolver, here on the same family.
    forwarded = await h.udp_query("www.example.test.")
    assert forwarded is not None and [r.address for r in forwarded.answer[0]] == ["192.0.2.1"]
    assert h.upstream.received == 1


@pytest.mark.asyncio
async def test_ipv6_disabled_gives_no_aaaa_records(make_harness) -> None:
    """ztunnel's service_family_allowed: IPV6_ENABLED=false answers AAAA with nothing."""
    h = await make_harness(ipv6_enabled=False)
    aaaa = await h.udp_query("dual.ns1.svc.cluster.local.", rdtype="AAAA")
    assert aaaa is not None and aaaa.rcode() == dns.rcode.NOERROR and aaaa.answer == []
    a = await h.udp_query("dual.ns1.svc.cluster.local.", rdtype="A")
    assert a is not None and [r.address for r in a.answer[0]] == ["10.96.0.8"]
