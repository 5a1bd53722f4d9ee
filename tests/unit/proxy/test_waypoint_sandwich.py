"""``is_waypoint_of``: the inbound "waypoint sandwich" check, in the cases ztunnel's
``find_inbound_upstream`` tests cover (waypoint attached to the workload or to the service,
referenced by the waypoint pod's IP, its service VIP or its hostname; wrong attachments)."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, replace

import pytest

from ztunnel_py.proxy.routing import is_waypoint_of
from ztunnel_py.state.model import (
    CidrVip,
    GatewayAddress,
    NamespacedHostname,
    NetworkAddress,
    Service,
    Workload,
)
from ztunnel_py.state.store import ProxyState, UpdateBatch

WAYPOINT_POD = "10.0.0.100"
WAYPOINT_VIP = "10.96.0.100"
SERVER_POD = "10.0.0.2"
SERVER_VIP = "10.96.0.2"
CLIENT_POD = "10.0.0.1"
OTHER_POD = "10.0.0.50"


def ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return ipaddress.ip_address(text)


def by_ip(text: str) -> GatewayAddress:
    return GatewayAddress(destination=NetworkAddress("", ip(text)))


BY_HOSTNAME = GatewayAddress(destination=NamespacedHostname("ns", "waypoint.ns.svc.cluster.local"))


def workload(name: str, addr: str, **kw: object) -> Workload:
    return Workload(
        uid=f"Kubernetes//Pod/ns/{name}",
        name=name,
        namespace="ns",
        workload_ips=(ip(addr),),
        **kw,  # type: ignore[arg-type]
    )


def service(name: str, vip: str, **kw: object) -> Service:
    return Service(
        name=name,
        namespace="ns",
        hostname=f"{name}.ns.svc.cluster.local",
        vips=(NetworkAddress("", ip(vip)),),
        **{"ports": {80: 8080}, **kw},  # type: ignore[arg-type]
    )


WAYPOINT = workload(
    "waypoint", WAYPOINT_POD, services={"ns/waypoint.ns.svc.cluster.local": {15008: 15008}}
)
OTHER_WAYPOINT = workload("other-waypoint", OTHER_POD)


@dataclass
class Case:
    name: str
    target: str
    workload_waypoint: GatewayAddress | None = None
    service_waypoint: GatewayAddress | None = None
    local: Workload = WAYPOINT
    expected: bool = True


CASES = [
    Case("workload-attached, referenced by the waypoint pod", SERVER_POD, by_ip(WAYPOINT_POD)),
    Case("workload-attached, referenced by the waypoint vip", SERVER_POD, by_ip(WAYPOINT_VIP)),
    Case("workload-attached, referenced by hostname", SERVER_POD, BY_HOSTNAME),
    Case("service-attached, referenced by the waypoint pod", SERVER_VIP, None, by_ip(WAYPOINT_POD)),
    Case("service-attached, referenced by the waypoint vip", SERVER_VIP, None, by_ip(WAYPOINT_VIP)),
    Case("service-attached, referenced by hostname", SERVER_VIP, None, BY_HOSTNAME),
    Case("no waypoint at all", SERVER_POD, expected=False),
    Case("to the client, which has no waypoint", CLIENT_POD, expected=False),
    Case(
        "service-attached waypoint but the request names the workload",
        SERVER_POD,
        None,
        by_ip(WAYPOINT_POD),
        expected=False,
    ),
    Case(
        "workload-attached waypoint but the request names the service",
        SERVER_VIP,
        by_ip(WAYPOINT_POD),
        expected=False,
    ),
    Case(
        "another pod's waypoint",
        SERVER_POD,
        by_ip(OTHER_POD),
        expected=False,
    ),
    Case(
        "a pod that is not an endpoint of the waypoint service",
        SERVER_POD,
        by_ip(WAYPOINT_VIP),
        local=OTHER_WAYPOINT,
        expected=False,
    ),
    Case("an unknown address", "10.9.9.9", by_ip(WAYPOINT_POD), expected=False),
    Case(
        "a waypoint reference that resolves to nothing",
        SERVER_POD,
        by_ip("10.9.9.9"),
        expected=False,
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_is_waypoint_of(case: Case) -> None:
    state = ProxyState()
    server = workload(
        "server",
        SERVER_POD,
        waypoint=case.workload_waypoint,
        services={"ns/server.ns.svc.cluster.local": {80: 8080}},
    )
    state.apply(
        UpdateBatch(
            workloads=(WAYPOINT, OTHER_WAYPOINT, server, workload("client", CLIENT_POD)),
            services=(
                service("waypoint", WAYPOINT_VIP, ports={15008: 15008}),
                service("server", SERVER_VIP, waypoint=case.service_waypoint),
            ),
        )
    )
    local_ip = case.local.workload_ips[0]
    target = NetworkAddress("", ip(case.target))
    assert is_waypoint_of(state, target, case.local, local_ip) is case.expected


def test_a_cidr_vip_with_this_waypoint_counts() -> None:
    state = ProxyState()
    ranged = replace(
        service("range", "10.200.0.1", waypoint=by_ip(WAYPOINT_POD)),
        vips=(),
        cidr_vips=(CidrVip("", ipaddress.ip_network("10.200.0.0/16")),),
    )
    state.apply(UpdateBatch(workloads=(WAYPOINT,), services=(ranged,)))
    target = NetworkAddress("", ip("10.200.3.4"))
    assert is_waypoint_of(state, target, WAYPOINT, ip(WAYPOINT_POD))
    elsewhere = NetworkAddress("other-network", ip("10.200.3.4"))
    assert not is_waypoint_of(state, elsewhere, WAYPOINT, ip(WAYPOINT_POD))
