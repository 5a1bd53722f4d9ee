"""bpf.projection: which destinations are captured, and the per-pod entries (pure)."""

from __future__ import annotations

import ipaddress
from dataclasses import replace

import pytest

from ztunnel_py.bpf import _types as t
from ztunnel_py.bpf.dump import describe
from ztunnel_py.bpf.projection import (
    POD_FLAGS,
    EnrolledPod,
    addr16,
    deny_key,
    dst_cidr_key,
    dst_key,
    from_addr16,
    local_key,
    pod_key,
    project,
)
from ztunnel_py.ip import IPNetwork
from ztunnel_py.rbac.model import Action, Authorization, Match, Scope
from ztunnel_py.state.model import (
    CidrVip,
    GatewayAddress,
    InboundProtocol,
    NetworkAddress,
    NetworkMode,
    Service,
    Workload,
    frozen_map,
)
from ztunnel_py.state.store import ProxyState, UpdateBatch

ip = ipaddress.ip_address


def workload(uid: str, *ips: str, hbone: bool = True, **kw: object) -> Workload:
    return Workload(
        uid=uid,
        name=uid,
        namespace="default",
        workload_ips=tuple(ip(a) for a in ips),
        protocol=InboundProtocol.HBONE if hbone else InboundProtocol.TCP,
        **kw,  # type: ignore[arg-type]
    )


def service(name: str, *vips: str, ports: dict[int, int] | None = None, **kw: object) -> Service:
    return Service(
        name=name,
        namespace="default",
        hostname=f"{name}.default.svc.cluster.local",
        vips=tuple(NetworkAddress("", ip(v)) for v in vips),
        ports=frozen_map(ports if ports is not None else {80: 8080}),
        **kw,  # type: ignore[arg-type]
    )


def member(w: Workload, s: Service) -> Workload:
    """``w`` as an endpoint of ``s``."""
    return replace(w, services=frozen_map({s.key: frozen_map(dict(s.ports))}))


def state_of(*items: Workload | Service) -> ProxyState:
    state = ProxyState()
    state.apply(
        UpdateBatch(
            workloads=tuple(i for i in items if isinstance(i, Workload)),
            services=tuple(i for i in items if isinstance(i, Service)),
        )
    )
    return state


def captured(state: ProxyState, network: str = "") -> set[tuple[str, int | str]]:
    maps = project(state, [], network=network)
    return {
        (d["address"], d["port"])
        for d in (describe(t.MAP_DST, k, v) for k, v in maps[t.MAP_DST].items())
    }


# ------------------------------------------------------------------ mesh destinations


def test_projection_hbone_workload_ip_is_captured_on_every_port() -> None:
    assert captured(state_of(workload("a", "10.0.0.5", "fd00::5"))) == {
        ("10.0.0.5", "*"),
        ("fd00::5", "*"),
    }


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ({}, False),
        ({"waypoint": GatewayAddress(destination=NetworkAddress("", ip("10.0.9.9")))}, True),
        ({"network_gateway": GatewayAddress(destination=NetworkAddress("", ip("1.2.3.4")))}, True),
        ({"native_tunnel": True}, True),
    ],
    ids=["plain-tcp", "waypoint", "network-gateway", "native-tunnel"],
)
def test_projection_plain_tcp_workload_is_captured_only_when_it_needs_the_proxy(
    extra: dict[str, object], expected: bool
) -> None:
    state = state_of(workload("a", "10.0.0.5", hbone=False, **extra))
    assert (("10.0.0.5", "*") in captured(state)) is expected


def test_projection_skips_host_network_and_other_network_workloads() -> None:
    state = state_of(
        workload("host", "10.0.0.1", network_mode=NetworkMode.HOST_NETWORK),
        workload("remote", "10.0.0.2", network="west"),
    )
    assert captured(state) == set()
    assert captured(state, network="west") == {("10.0.0.2", "*")}


def test_projection_service_with_hbone_endpoint_is_captured_per_port() -> None:
    svc = service("echo", "10.96.0.10", "fd00:96::10", ports={80: 8080, 443: 8443})
    state = state_of(svc, member(workload("a", "10.0.0.5"), svc))
    assert {
        ("10.96.0.10", 80),
        ("10.96.0.10", 443),
        ("fd00:96::10", 80),
        ("fd00:96::10", 443),
    } <= captured(state)


def test_projection_service_of_plain_tcp_endpoints_stays_in_the_kernel() -> None:
    svc = service("legacy", "10.96.0.11")
    state = state_of(svc, member(workload("b", "10.0.0.6", hbone=False), svc))
    assert captured(state) == set()


def test_projection_service_of_hostname_endpoints_goes_to_the_proxy() -> None:
    # A ServiceEntry with resolution DNS: only the proxy can turn its VIP into an address.
    svc = service("ext", "240.240.0.9")
    state = state_of(svc, member(workload("c", hbone=False, hostname="ext.example.test"), svc))
    assert captured(state) == {("240.240.0.9", 80)}


def test_projection_service_without_endpoints_is_not_captured() -> None:
    assert captured(state_of(service("empty", "10.96.0.12"))) == set()


def test_projection_service_with_waypoint_or_remote_endpoint_is_captured() -> None:
    waypoint = GatewayAddress(destination=NetworkAddress("", ip("10.0.9.9")))
    svc = service("wp", "10.96.0.13", waypoint=waypoint)
    remote = service("remote", "10.96.0.14")
    state = state_of(
        svc, remote, member(workload("r", "10.1.0.1", hbone=False, network="west"), remote)
    )
    assert captured(state) == {("10.96.0.13", 80), ("10.96.0.14", 80)}


def test_projection_service_without_ports_is_captured_on_every_port() -> None:
    svc = service(
        "any",
        "10.96.0.15",
        ports={},
        waypoint=GatewayAddress(destination=NetworkAddress("", ip("10.0.9.9"))),
    )
    assert captured(state_of(svc)) == {("10.96.0.15", "*")}


def test_projection_vip_of_another_network_is_not_captured() -> None:
    svc = Service(
        name="x",
        namespace="default",
        hostname="x.default.svc.cluster.local",
        vips=(NetworkAddress("west", ip("10.96.0.16")),),
        ports=frozen_map({80: 80}),
        waypoint=GatewayAddress(destination=NetworkAddress("", ip("10.0.9.9"))),
    )
    assert captured(state_of(svc)) == set()


# ------------------------------------------------------------------ encodings


def test_projection_addresses_are_ipv4_mapped_network_order() -> None:
    assert addr16(ip("10.1.2.3")) == bytes(10) + b"\xff\xff\x0a\x01\x02\x03"
    assert from_addr16(addr16(ip("10.1.2.3"))) == ip("10.1.2.3")
    assert from_addr16(addr16(ip("fd00::1"))) == ip("fd00::1")
    key = dst_key(ip("10.1.2.3"), 80)
    assert key[16:18] == b"\x00\x50"  # port in network order
    assert len(key) == t.SIZEOF_ZT_DST_KEY


@pytest.mark.parametrize(
    ("src", "port", "prefixlen", "family", "addr"),
    [
        (None, 8080, 80, 0, bytes(16)),
        (ipaddress.ip_network("10.1.0.0/16"), None, 88 + 16, 2, bytes([10, 1, 0, 0]) + bytes(12)),
        (ipaddress.ip_network("fd00:1::/32"), 443, 88 + 32, 10, ip("fd00:1::").packed),
        (ipaddress.ip_network("0.0.0.0/0"), None, 88, 2, bytes(16)),
        (ipaddress.ip_network("::/0"), None, 88, 10, bytes(16)),
    ],
)
def test_projection_deny_key_is_exact(
    src: IPNetwork | None, port: int | None, prefixlen: int, family: int, addr: bytes
) -> None:
    cookie = 0x1122334455667788
    raw = deny_key(cookie, src, port)
    assert raw is not None
    key = t.ZtDenyKey.from_buffer_copy(raw)
    assert key.prefixlen == prefixlen
    assert key.family == family  # inside the prefix whenever there is a source: no v4/v6 overlap
    assert key.netns_cookie_lo | (key.netns_cookie_hi << 32) == cookie
    assert bytes(key.addr) == addr
    assert raw[12:14] == (port or 0).to_bytes(2, "big")


def test_projection_deny_rule_on_port_zero_never_matches_and_is_left_out() -> None:
    assert deny_key(1, None, 0) is None
    with pytest.raises(ValueError, match="port 70000"):
        deny_key(1, None, 70000)


# ------------------------------------------------------------------ pods


def test_projection_pod_entries_local_addresses_and_deny_rules() -> None:
    w = workload("pod-a", "10.0.0.5")
    deny = Authorization(
        name="deny-ext",
        namespace="default",
        scope=Scope.NAMESPACE,
        action=Action.DENY,
        rules=(
            (
                (
                    Match(
                        source_ips=(ipaddress.ip_network("192.168.0.0/16"),),
                        destination_ports=(8080,),
                    ),
                ),
            ),
        ),
    )
    state = state_of(w)
    state.apply(UpdateBatch(policies=(deny,)))
    pod = EnrolledPod("uid-a", 42, (ip("10.0.0.5"),), "pod-a")
    maps = project(state, [pod])  # rbac.kernel compiles the DENY rules

    assert maps[t.MAP_PODS] == {pod_key(42): bytes(t.ZtPod(flags=POD_FLAGS))}
    assert set(maps[t.MAP_LOCAL]) == {local_key(42, ip("10.0.0.5"))}
    assert [describe(t.MAP_DENY, k, v) for k, v in maps[t.MAP_DENY].items()] == [
        {"netnsCookie": 42, "source": "192.168.0.0/16", "port": 8080}
    ]
    # Without a compiler, or for a pod whose workload is unknown, no kernel rule.
    assert project(state, [pod], compile_deny=None)[t.MAP_DENY] == {}
    unknown = EnrolledPod("uid-b", 43, (), None)
    assert project(state, [unknown])[t.MAP_DENY] == {}
    assert pod_key(43) in project(state, [unknown])[t.MAP_PODS]


# ------------------------------------------------------------------ CIDR VIPs (zt_dst_cidr)


def cidr_service(name: str, *prefixes: str, network: str = "", **kw: object) -> Service:
    cidrs = tuple(CidrVip(network, ipaddress.ip_network(p)) for p in prefixes)
    return service(name, cidr_vips=cidrs, **kw)  # type: ignore[arg-type]


def captured_cidrs(state: ProxyState, network: str = "") -> set[tuple[str, int | str]]:
    maps = project(state, [], network=network)
    return {
        (d["prefix"], d["port"])
        for d in (describe(t.MAP_DST_CIDR, k, v) for k, v in maps[t.MAP_DST_CIDR].items())
    }


def test_projection_cidr_vips_of_a_mesh_service_go_to_the_trie_per_port() -> None:
    svc = cidr_service("range", "10.200.0.0/16", "fd00:200::/64", ports={80: 8080, 443: 8443})
    state = state_of(svc, member(workload("a", "10.0.0.5"), svc))
    assert captured_cidrs(state) == {
        ("10.200.0.0/16", 80),
        ("10.200.0.0/16", 443),
        ("fd00:200::/64", 80),
        ("fd00:200::/64", 443),
    }
    assert ("10.200.0.0", 80) not in captured(state)  # never a host entry


def test_projection_cidr_vips_follow_the_vip_rules() -> None:
    waypoint = GatewayAddress(destination=NetworkAddress("", ip("10.0.9.9")))
    plain = cidr_service("plain", "10.201.0.0/16")
    state = state_of(
        plain,
        member(workload("b", "10.0.0.6", hbone=False), plain),
        cidr_service("any-port", "10.202.0.0/16", ports={}, waypoint=waypoint),
        cidr_service("elsewhere", "10.203.0.0/16", network="west", waypoint=waypoint),
    )
    # Plain-TCP endpoints stay in the kernel; no ports means every port; other networks' out.
    assert captured_cidrs(state) == {("10.202.0.0/16", "*")}
    assert captured_cidrs(state, network="west") == {("10.203.0.0/16", 80)}


def test_cidr_trie_key_counts_the_port_and_the_ipv4_mapping() -> None:
    v4 = t.ZtDstCidrKey.from_buffer_copy(dst_cidr_key(ipaddress.ip_network("10.200.0.0/16"), 80))
    v6 = t.ZtDstCidrKey.from_buffer_copy(dst_cidr_key(ipaddress.ip_network("fd00::/8"), 0))
    assert (v4.prefixlen, bytes(v4.addr)) == (16 + 96 + 16, addr16(ip("10.200.0.0")))
    assert (v6.prefixlen, bytes(v6.addr)) == (16 + 8, addr16(ip("fd00::")))
    assert describe(t.MAP_DST_CIDR, bytes(v4), bytes(t.ZtDst(kind=t.ZT_DST_SERVICE))) == {
        "prefix": "10.200.0.0/16",
        "port": 80,
        "kind": "service",
    }


def test_ipv4_mapped_addresses_from_xds_never_reach_the_kernel() -> None:
    """ztunnel keeps ``::ffff:a.b.c.d`` as an IPv6 address that no connection (looked up by its
    canonical address) ever matches; in the 16-byte layout it would be a.b.c.d itself."""
    svc = service("mapped", "::ffff:10.96.0.20", "fd00:96::20")
    hbone = workload("a", "::ffff:10.0.0.5", "fd00::5")
    ranges = cidr_service("ranges", "::ffff:10.200.0.0/112", "fd00:200::/64")
    ranges = replace(
        ranges, waypoint=GatewayAddress(destination=NetworkAddress("", ip("10.0.9.9")))
    )
    state = state_of(svc, member(hbone, svc), ranges)
    assert captured(state) == {("fd00:96::20", 80), ("fd00::5", "*")}
    assert captured_cidrs(state) == {("fd00:200::/64", 80)}

    pod = EnrolledPod("uid", 7, (ip("::ffff:10.0.0.5"), ip("fd00::5")))
    assert set(project(state, [pod])[t.MAP_LOCAL]) == {local_key(7, ip("fd00::5"))}
