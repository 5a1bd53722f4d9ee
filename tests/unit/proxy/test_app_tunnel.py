"""The PROXY v2 header ztunnel writes for app tunnels, and where the tunnel is dialled.

Headers are read back by an independent parser (the ``proxy-protocol`` package) and one is
compared byte for byte with a vector laid out by hand from HAProxy's proxy-protocol.txt.
"""

from __future__ import annotations

import ipaddress
import socket

import pytest
from proxyprotocol.result import ProxyResultIPv4, ProxyResultIPv6, ProxyResultUnknown
from proxyprotocol.v2 import ProxyProtocolV2

from ztunnel_py.proxy.app_tunnel import (
    PROXY_TLV_PEER_IDENTITY,
    AppTunnelError,
    TunnelRequest,
    proxy_v2_header,
    tunnel_request,
    upstream_route,
)
from ztunnel_py.state.model import (
    ApplicationTunnel,
    AppTunnelProtocol,
    NetworkAddress,
    Service,
    Workload,
)

ip = ipaddress.ip_address
ID = "spiffe://cluster.local/ns/default/sa/client"
PROXY = ApplicationTunnel(protocol=AppTunnelProtocol.PROXY, port=15088)


def test_ipv4_header_matches_the_specs_layout_byte_for_byte() -> None:
    header = proxy_v2_header((ip("10.0.0.1"), 41000), (ip("10.0.0.2"), 9000), ID)
    identity = ID.encode()
    expected = (
        bytes.fromhex("0d0a0d0a000d0a515549540a")  # signature
        + bytes([0x21])  # version 2, command PROXY
        + bytes([0x11])  # AF_INET, STREAM
        + (12 + 3 + len(identity)).to_bytes(2, "big")  # addresses + one TLV
        + bytes([10, 0, 0, 1, 10, 0, 0, 2])  # source, destination
        + (41000).to_bytes(2, "big")
        + (9000).to_bytes(2, "big")
        + bytes([0xD0])
        + len(identity).to_bytes(2, "big")
        + identity
    )
    assert header == expected


def test_ipv4_header_reads_back_with_an_independent_parser() -> None:
    header = proxy_v2_header((ip("10.0.0.1"), 41000), (ip("10.0.0.2"), 9000), ID)
    result = ProxyProtocolV2().unpack(header)
    assert isinstance(result, ProxyResultIPv4)
    assert result.source == (ip("10.0.0.1"), 41000)
    assert result.dest == (ip("10.0.0.2"), 9000)
    assert result.protocol == socket.SOCK_STREAM
    assert dict(result.tlv.items()) == {PROXY_TLV_PEER_IDENTITY: ID.encode()}


def test_ipv6_header_reads_back_with_an_independent_parser() -> None:
    header = proxy_v2_header((ip("fd00::1"), 5), (ip("fd00::2"), 8080), ID)
    assert header[13] == 0x21  # AF_INET6, STREAM
    result = ProxyProtocolV2().unpack(header)
    assert isinstance(result, ProxyResultIPv6)
    assert (result.source, result.dest) == ((ip("fd00::1"), 5), (ip("fd00::2"), 8080))
    assert dict(result.tlv.items()) == {PROXY_TLV_PEER_IDENTITY: ID.encode()}


def test_no_identity_means_no_tlv() -> None:
    header = proxy_v2_header((ip("10.0.0.1"), 1), (ip("10.0.0.2"), 2), None)
    assert len(header) == 16 + 12
    result = ProxyProtocolV2().unpack(header)
    assert dict(result.tlv.items()) == {}


def test_mixed_families_carry_no_addresses_but_keep_the_identity() -> None:
    header = proxy_v2_header((ip("10.0.0.1"), 1), (ip("fd00::2"), 2), ID)
    assert header[13] == 0x01  # AF_UNSPEC, STREAM
    result = ProxyProtocolV2().unpack(header)
    assert isinstance(result, ProxyResultUnknown)
    assert header.endswith(bytes([0xD0]) + len(ID).to_bytes(2, "big") + ID.encode())


def test_an_identity_too_long_for_the_header_is_refused() -> None:
    with pytest.raises(AppTunnelError, match="does not fit"):
        proxy_v2_header((ip("10.0.0.1"), 1), (ip("10.0.0.2"), 2), "x" * 70000)


def _workload(tunnel: ApplicationTunnel | None) -> Workload:
    return Workload(
        uid="u", name="w", namespace="default", workload_ips=(ip("10.0.0.2"),),
        application_tunnel=tunnel,
    )  # fmt: skip


def _service(*vips: NetworkAddress) -> Service:
    return Service(
        name="echo", namespace="default", hostname="echo.default.svc.cluster.local", vips=vips
    )


def test_tunnel_target_is_the_hbone_target_address() -> None:
    assert tunnel_request(
        _workload(PROXY), target_ip=ip("10.0.0.9"), port=80, service=None, network=""
    ) == TunnelRequest(AppTunnelProtocol.PROXY, (ip("10.0.0.9"), 80))
    assert (
        tunnel_request(_workload(None), target_ip=ip("10.0.0.9"), port=80, service=None, network="")
        is None
    )


def test_a_service_hostname_becomes_its_vip_on_this_network_ipv4_first() -> None:
    svc = _service(
        NetworkAddress("other", ip("10.9.0.1")),
        NetworkAddress("net1", ip("fd00::10")),
        NetworkAddress("net1", ip("10.96.0.10")),
    )
    got = tunnel_request(_workload(PROXY), target_ip=None, port=80, service=svc, network="net1")
    assert got == TunnelRequest(AppTunnelProtocol.PROXY, (ip("10.96.0.10"), 80))
    v6_only = _service(NetworkAddress("net1", ip("fd00::10")), NetworkAddress("x", ip("10.0.0.1")))
    got = tunnel_request(_workload(PROXY), target_ip=None, port=80, service=v6_only, network="net1")
    assert got == TunnelRequest(AppTunnelProtocol.PROXY, (ip("fd00::10"), 80))


def test_a_service_without_a_vip_cannot_be_named_in_the_header() -> None:
    with pytest.raises(AppTunnelError, match=r"echo\.default\.svc\.cluster\.local has no VIP"):
        tunnel_request(_workload(PROXY), target_ip=None, port=80, service=_service(), network="")


PEER = ip("10.0.1.5")


@pytest.mark.parametrize(
    ("upstream", "loopback"),
    [((ip("10.0.0.2"), 15088), ip("127.0.0.1")), ((ip("fd00::2"), 15088), ip("::1"))],
)
def test_localhost_app_tunnel_dials_loopback_without_a_spoofed_source(
    upstream: tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int],
    loopback: ipaddress.IPv4Address | ipaddress.IPv6Address,
) -> None:
    tunnel = TunnelRequest(AppTunnelProtocol.PROXY, (ip("10.0.0.2"), 80))
    got = upstream_route(upstream, tunnel, peer_ip=PEER, orig_src=True, localhost_app_tunnel=True)
    assert got == (None, (loopback, 15088))
    # Switched off, the pod's address is dialled (from the client's IP with original source).
    got = upstream_route(upstream, tunnel, peer_ip=PEER, orig_src=True, localhost_app_tunnel=False)
    assert got == (PEER, upstream)


def test_original_source_binds_the_clients_ip_unless_it_is_the_pods_own() -> None:
    upstream = (ip("10.0.0.2"), 80)
    assert upstream_route(
        upstream, None, peer_ip=PEER, orig_src=True, localhost_app_tunnel=True
    ) == (PEER, upstream)
    assert upstream_route(
        upstream, None, peer_ip=PEER, orig_src=False, localhost_app_tunnel=True
    ) == (None, upstream)
    assert upstream_route(
        upstream, None, peer_ip=ip("10.0.0.2"), orig_src=True, localhost_app_tunnel=True
    ) == (None, upstream)
    # A tunnel that is not PROXY is never moved to loopback.
    none_tunnel = TunnelRequest(AppTunnelProtocol.NONE, upstream)
    assert upstream_route(
        upstream, none_tunnel, peer_ip=PEER, orig_src=False, localhost_app_tunnel=True
    ) == (None, upstream)
