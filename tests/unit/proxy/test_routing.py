"""ztunnel's outbound decision (build_request) as a table: state, source, target -> Route."""

from __future__ import annotations

import ipaddress
import random
from collections import Counter
from dataclasses import dataclass, field, replace

import pytest

from ztunnel_py.identity.spiffe import Identity
from ztunnel_py.proxy.routing import (
    NoHealthyUpstream,
    NoValidDestination,
    Route,
    RouteKind,
    RoutingError,
    UnknownWaypoint,
    route_outbound,
    sample_weighted_waypoint,
)
from ztunnel_py.state.model import (
    CidrVip,
    GatewayAddress,
    HealthStatus,
    InboundProtocol,
    LoadBalancer,
    LoadBalancerHealthPolicy,
    LoadBalancerMode,
    LoadBalancerScope,
    Locality,
    NamespacedHostname,
    NetworkAddress,
    Service,
    WeightedWaypoint,
    Workload,
)
from ztunnel_py.state.store import ProxyState, UpdateBatch

ip = ipaddress.ip_address


def wl(
    name: str, addr: str | None, *, ns: str = "default", sa: str | None = None, **kw: object
) -> Workload:
    return Workload(
        uid=f"cluster1//v1/Pod/{ns}/{name}",
        name=name,
        namespace=ns,
        service_account=sa or name,
        workload_ips=(ip(addr),) if addr else (),
        protocol=kw.pop("protocol", InboundProtocol.HBONE),  # type: ignore[arg-type]
        **kw,  # type: ignore[arg-type]
    )


def svc(
    name: str, vip: str, *, ns: str = "default", ports: dict[int, int] | None = None, **kw: object
) -> Service:
    return Service(
        name=name,
        namespace=ns,
        hostname=f"{name}.{ns}.svc.cluster.local",
        vips=(NetworkAddress("", ip(vip)),),
        ports=ports if ports is not None else {80: 8080},
        **kw,  # type: ignore[arg-type]
    )


def cidr(name: str, prefix: str, **kw: object) -> Service:
    """A service whose only VIP is a whole prefix."""
    vip = ipaddress.ip_network(prefix)
    return replace(svc(name, "0.0.0.0", **kw), vips=(), cidr_vips=(CidrVip("", vip),))  # type: ignore[arg-type]


def member(
    service: str, ports: dict[int, int] | None = None, ns: str = "default"
) -> dict[str, dict[int, int]]:
    return {f"{ns}/{service}.{ns}.svc.cluster.local": ports if ports is not None else {80: 8080}}


SOURCE = wl("client", "10.0.0.1")
WAYPOINT_GW = GatewayAddress(
    destination=NamespacedHostname("default", "waypoint.default.svc.cluster.local")
)


@dataclass
class Case:
    name: str
    target: str
    workloads: list[Workload] = field(default_factory=list)
    services: list[Service] = field(default_factory=list)
    source: Workload = SOURCE
    source_ip: str = "10.0.0.1"
    kind: RouteKind | None = None
    next_hop: str | None = None
    authority: str | None = None
    identities: tuple[str, ...] = ()
    via_waypoint: bool = False
    service: str | None = None
    error: type[RoutingError] | None = None


def sid(name: str, ns: str = "default") -> str:
    return f"spiffe://cluster.local/ns/{ns}/sa/{name}"


waypoint = wl("waypoint", "10.0.0.100", services=member("waypoint", {15008: 15008}))
waypoint_svc = svc("waypoint", "10.96.0.100", ports={15008: 15008})

CASES = [
    Case(
        "unknown destination passes through",
        "1.1.1.1:80",
        kind=RouteKind.PASSTHROUGH,
        next_hop="1.1.1.1:80",
    ),
    Case(
        "hbone workload by ip",
        "10.0.0.2:8080",
        [wl("server", "10.0.0.2")],
        kind=RouteKind.HBONE,
        next_hop="10.0.0.2:15008",
        authority="10.0.0.2:8080",
        identities=(sid("server"),),
    ),
    Case(
        "tcp workload by ip is plain tcp",
        "10.0.0.3:8080",
        [wl("legacy", "10.0.0.3", protocol=InboundProtocol.TCP)],
        kind=RouteKind.TCP,
        next_hop="10.0.0.3:8080",
    ),
    Case(
        "service vip maps service port to target port",
        "10.96.0.1:80",
        [wl("server", "10.0.0.2", services=member("echo"))],
        [svc("echo", "10.96.0.1")],
        kind=RouteKind.HBONE,
        next_hop="10.0.0.2:15008",
        authority="10.0.0.2:8080",
        identities=(sid("server"),),
        service="echo",
    ),
    Case(
        "service to tcp endpoint is plain tcp to the target port",
        "10.96.0.1:80",
        [wl("legacy", "10.0.0.3", protocol=InboundProtocol.TCP, services=member("echo"))],
        [svc("echo", "10.96.0.1")],
        kind=RouteKind.TCP,
        next_hop="10.0.0.3:8080",
        service="echo",
    ),
    Case(
        "service subject alt names are accepted too",
        "10.96.0.1:80",
        [wl("server", "10.0.0.2", services=member("echo"))],
        [svc("echo", "10.96.0.1", subject_alt_names=(sid("other", "x"), "not-a-spiffe-id"))],
        kind=RouteKind.HBONE,
        next_hop="10.0.0.2:15008",
        authority="10.0.0.2:8080",
        identities=(sid("other", "x"), sid("server")),
        service="echo",
    ),
    Case(
        "service port unknown is no healthy upstream",
        "10.96.0.1:81",
        [wl("server", "10.0.0.2", services=member("echo"))],
        [svc("echo", "10.96.0.1")],
        error=NoHealthyUpstream,
    ),
    Case(
        "service without endpoints is no healthy upstream",
        "10.96.0.1:80",
        [],
        [svc("echo", "10.96.0.1")],
        error=NoHealthyUpstream,
    ),
    Case(
        "unhealthy endpoint is excluded",
        "10.96.0.1:80",
        [wl("server", "10.0.0.2", services=member("echo"), status=HealthStatus.UNHEALTHY)],
        [svc("echo", "10.96.0.1")],
        error=NoHealthyUpstream,
    ),
    Case(
        "unhealthy endpoint is used with ALLOW_ALL",
        "10.96.0.1:80",
        [wl("server", "10.0.0.2", services=member("echo"), status=HealthStatus.UNHEALTHY)],
        [
            svc(
                "echo",
                "10.96.0.1",
                load_balancer=LoadBalancer(health_policy=LoadBalancerHealthPolicy.ALLOW_ALL),
            )
        ],
        kind=RouteKind.HBONE,
        next_hop="10.0.0.2:15008",
        authority="10.0.0.2:8080",
        identities=(sid("server"),),
        service="echo",
    ),
    Case(
        "passthrough service goes to the original destination",
        "10.96.0.1:80",
        [],
        [svc("echo", "10.96.0.1", load_balancer=LoadBalancer(mode=LoadBalancerMode.PASSTHROUGH))],
        kind=RouteKind.PASSTHROUGH,
        next_hop="10.96.0.1:80",
    ),
    Case(
        "target port 0 uses the workload's own mapping",
        "10.96.0.1:80",
        [wl("server", "10.0.0.2", services=member("echo", {80: 9090}))],
        [svc("echo", "10.96.0.1", ports={80: 0})],
        kind=RouteKind.HBONE,
        next_hop="10.0.0.2:15008",
        authority="10.0.0.2:9090",
        identities=(sid("server"),),
        service="echo",
    ),
    Case(
        "target port 0 without a workload mapping filters the endpoint",
        "10.96.0.1:80",
        [wl("server", "10.0.0.2", services=member("echo", {}))],
        [svc("echo", "10.96.0.1", ports={80: 0})],
        error=NoHealthyUpstream,
    ),
    Case(
        "endpoint mapping wins over the service's",
        "10.96.0.1:80",
        [wl("server", "10.0.0.2", services=member("echo", {80: 7070}))],
        [svc("echo", "10.96.0.1")],
        kind=RouteKind.HBONE,
        next_hop="10.0.0.2:15008",
        authority="10.0.0.2:7070",
        identities=(sid("server"),),
        service="echo",
    ),
    Case(
        "vip shared by namespaces prefers the client's",
        "10.96.0.1:80",
        [
            wl("mine", "10.0.0.2", services=member("echo")),
            wl("theirs", "10.0.1.2", ns="other", services=member("echo", ns="other")),
        ],
        [svc("echo", "10.96.0.1", ns="other"), svc("echo", "10.96.0.1")],
        kind=RouteKind.HBONE,
        next_hop="10.0.0.2:15008",
        authority="10.0.0.2:8080",
        identities=(sid("mine"),),
        service="echo",
    ),
    Case(
        "workload ip wins over a service vip",
        "10.0.0.2:8080",
        [wl("server", "10.0.0.2", services=member("echo"))],
        [svc("echo", "10.0.0.2")],
        kind=RouteKind.HBONE,
        next_hop="10.0.0.2:15008",
        authority="10.0.0.2:8080",
        identities=(sid("server"),),
    ),
    Case(
        "service waypoint",
        "10.96.0.1:80",
        [wl("server", "10.0.0.2", services=member("echo")), waypoint],
        [svc("echo", "10.96.0.1", waypoint=WAYPOINT_GW), waypoint_svc],
        kind=RouteKind.HBONE,
        next_hop="10.0.0.100:15008",
        authority="10.96.0.1:80",
        identities=(sid("waypoint"),),
        via_waypoint=True,
        service="echo",
    ),
    Case(
        "service waypoint by address",
        "10.96.0.1:80",
        [wl("server", "10.0.0.2", services=member("echo")), waypoint],
        [
            svc(
                "echo",
                "10.96.0.1",
                waypoint=GatewayAddress(destination=NetworkAddress("", ip("10.0.0.100"))),
            )
        ],
        kind=RouteKind.HBONE,
        next_hop="10.0.0.100:15008",
        authority="10.96.0.1:80",
        identities=(sid("waypoint"),),
        via_waypoint=True,
        service="echo",
    ),
    Case(
        "service waypoint wins over passthrough",
        "10.96.0.1:80",
        [waypoint],
        [
            svc(
                "echo",
                "10.96.0.1",
                waypoint=WAYPOINT_GW,
                load_balancer=LoadBalancer(mode=LoadBalancerMode.PASSTHROUGH),
            ),
            waypoint_svc,
        ],
        kind=RouteKind.HBONE,
        next_hop="10.0.0.100:15008",
        authority="10.96.0.1:80",
        identities=(sid("waypoint"),),
        via_waypoint=True,
        service="echo",
    ),
    Case(
        "missing waypoint is an error",
        "10.96.0.1:80",
        [wl("server", "10.0.0.2", services=member("echo"))],
        [svc("echo", "10.96.0.1", waypoint=WAYPOINT_GW)],
        error=UnknownWaypoint,
    ),
    Case(
        "waypoint by unknown address is an error",
        "10.96.0.1:80",
        [wl("server", "10.0.0.2", services=member("echo"))],
        [
            svc(
                "echo",
                "10.96.0.1",
                waypoint=GatewayAddress(destination=NetworkAddress("", ip("10.9.9.9"))),
            )
        ],
        error=UnknownWaypoint,
    ),
    Case(
        "workload waypoint",
        "10.0.0.2:8080",
        [wl("server", "10.0.0.2", waypoint=WAYPOINT_GW), waypoint],
        [waypoint_svc],
        kind=RouteKind.HBONE,
        next_hop="10.0.0.100:15008",
        authority="10.0.0.2:8080",
        identities=(sid("waypoint"),),
        via_waypoint=True,
    ),
    Case(
        "workload waypoint skipped when the source is the waypoint",
        "10.0.0.2:8080",
        [wl("server", "10.0.0.2", waypoint=WAYPOINT_GW), waypoint],
        [waypoint_svc],
        source=waypoint,
        source_ip="10.0.0.100",
        kind=RouteKind.HBONE,
        next_hop="10.0.0.2:15008",
        authority="10.0.0.2:8080",
        identities=(sid("server"),),
    ),
    Case(
        "same identity but another ip is not the waypoint",
        "10.0.0.2:8080",
        [wl("server", "10.0.0.2", waypoint=WAYPOINT_GW), waypoint],
        [waypoint_svc],
        source=waypoint,
        source_ip="10.0.0.55",
        kind=RouteKind.HBONE,
        next_hop="10.0.0.100:15008",
        authority="10.0.0.2:8080",
        identities=(sid("waypoint"),),
        via_waypoint=True,
    ),
    Case(
        "workload waypoint by address, source is it",
        "10.0.0.2:8080",
        [
            wl(
                "server",
                "10.0.0.2",
                waypoint=GatewayAddress(destination=NetworkAddress("", ip("10.0.0.100"))),
            ),
            waypoint,
        ],
        source=waypoint,
        source_ip="10.0.0.100",
        kind=RouteKind.HBONE,
        next_hop="10.0.0.2:15008",
        authority="10.0.0.2:8080",
        identities=(sid("server"),),
    ),
    Case(
        "service-addressed traffic ignores the endpoint's workload waypoint",
        "10.96.0.1:80",
        [wl("server", "10.0.0.2", services=member("echo"), waypoint=WAYPOINT_GW), waypoint],
        [svc("echo", "10.96.0.1"), waypoint_svc],
        kind=RouteKind.HBONE,
        next_hop="10.0.0.2:15008",
        authority="10.0.0.2:8080",
        identities=(sid("server"),),
        service="echo",
    ),
    Case(
        "endpoint on another network without a network gateway cannot be reached",
        "10.96.0.1:80",
        [wl("remote", "10.1.0.2", network="net2", services=member("echo"))],
        [svc("echo", "10.96.0.1")],
        error=NoValidDestination,
    ),
    Case(
        "ipv6 workload authority is bracketed",
        "[fd00::2]:8080",
        [wl("server", "fd00::2")],
        kind=RouteKind.HBONE,
        next_hop="[fd00::2]:15008",
        authority="[fd00::2]:8080",
        identities=(sid("server"),),
    ),
    Case(
        "dual-stack workload answers in the target's family",
        "10.96.0.1:80",
        [
            replace(
                wl("server", "fd00::2", services=member("echo")),
                workload_ips=(ip("fd00::2"), ip("10.0.0.2")),
            )
        ],
        [svc("echo", "10.96.0.1")],
        kind=RouteKind.HBONE,
        next_hop="10.0.0.2:15008",
        authority="10.0.0.2:8080",
        identities=(sid("server"),),
        service="echo",
    ),
    Case(
        "strict locality drops endpoints elsewhere",
        "10.96.0.1:80",
        [wl("far", "10.0.0.2", services=member("echo"), locality=Locality(region="eu"))],
        [
            svc(
                "echo",
                "10.96.0.1",
                load_balancer=LoadBalancer(
                    mode=LoadBalancerMode.STRICT, routing_preferences=(LoadBalancerScope.REGION,)
                ),
            )
        ],
        error=NoHealthyUpstream,
    ),
    Case(
        "failover prefers the same zone",
        "10.96.0.1:80",
        [
            wl(
                "far", "10.0.0.2", services=member("echo"), locality=Locality(region="us", zone="b")
            ),
            wl(
                "near",
                "10.0.0.3",
                services=member("echo"),
                locality=Locality(region="us", zone="a"),
            ),
        ],
        [
            svc(
                "echo",
                "10.96.0.1",
                load_balancer=LoadBalancer(
                    mode=LoadBalancerMode.FAILOVER,
                    routing_preferences=(LoadBalancerScope.REGION, LoadBalancerScope.ZONE),
                ),
            )
        ],
        source=wl("client", "10.0.0.1", locality=Locality(region="us", zone="a")),
        kind=RouteKind.HBONE,
        next_hop="10.0.0.3:15008",
        authority="10.0.0.3:8080",
        identities=(sid("near"),),
        service="echo",
    ),
    Case(
        "failover falls back when nothing is near",
        "10.96.0.1:80",
        [wl("far", "10.0.0.2", services=member("echo"), locality=Locality(region="eu"))],
        [
            svc(
                "echo",
                "10.96.0.1",
                load_balancer=LoadBalancer(
                    mode=LoadBalancerMode.FAILOVER, routing_preferences=(LoadBalancerScope.REGION,)
                ),
            )
        ],
        kind=RouteKind.HBONE,
        next_hop="10.0.0.2:15008",
        authority="10.0.0.2:8080",
        identities=(sid("far"),),
        service="echo",
    ),
    Case(
        "network-first failover keeps ranking the other scopes",
        "10.96.0.1:80",
        [
            wl("node-a", "10.0.0.2", services=member("echo"), node="a"),
            wl("node-b", "10.0.0.3", services=member("echo"), node="b"),
        ],
        [
            svc(
                "echo",
                "10.96.0.1",
                load_balancer=LoadBalancer(
                    mode=LoadBalancerMode.FAILOVER,
                    routing_preferences=(LoadBalancerScope.NETWORK, LoadBalancerScope.NODE),
                ),
            )
        ],
        source=wl("client", "10.0.0.1", node="b"),
        kind=RouteKind.HBONE,
        next_hop="10.0.0.3:15008",
        authority="10.0.0.3:8080",
        identities=(sid("node-b"),),
        service="echo",
    ),
    Case(
        "zero capacity endpoint is never chosen",
        "10.96.0.1:80",
        [wl("zero", "10.0.0.2", services=member("echo"), capacity=0)],
        [svc("echo", "10.96.0.1")],
        error=NoHealthyUpstream,
    ),
    Case(
        "workload without an address or a hostname cannot be reached",
        "10.96.0.1:80",
        [wl("noip", None, services=member("echo"))],
        [svc("echo", "10.96.0.1")],
        error=NoHealthyUpstream,
    ),
    Case(
        "cidr vip routes to the service's endpoint",
        "10.200.0.7:80",
        [wl("server", "10.0.0.2", services=member("range"))],
        [cidr("range", "10.200.0.0/16")],
        kind=RouteKind.HBONE,
        next_hop="10.0.0.2:15008",
        authority="10.0.0.2:8080",
        identities=(sid("server"),),
        service="range",
    ),
    Case(
        "overlapping cidr vips: the longest prefix wins",
        "10.200.1.7:80",
        [
            wl("wide-pod", "10.0.0.2", services=member("wide")),
            wl("narrow-pod", "10.0.0.3", services=member("narrow")),
        ],
        [cidr("wide", "10.200.0.0/16"), cidr("narrow", "10.200.1.0/24")],
        kind=RouteKind.HBONE,
        next_hop="10.0.0.3:15008",
        authority="10.0.0.3:8080",
        identities=(sid("narrow-pod"),),
        service="narrow",
    ),
    Case(
        "overlapping cidr vips: outside the narrow prefix the wide one serves",
        "10.200.2.7:80",
        [
            wl("wide-pod", "10.0.0.2", services=member("wide")),
            wl("narrow-pod", "10.0.0.3", services=member("narrow")),
        ],
        [cidr("narrow", "10.200.1.0/24"), cidr("wide", "10.200.0.0/16")],
        kind=RouteKind.HBONE,
        next_hop="10.0.0.2:15008",
        authority="10.0.0.2:8080",
        identities=(sid("wide-pod"),),
        service="wide",
    ),
    Case(
        "a workload ip inside a cidr vip is the workload",
        "10.200.0.9:8080",
        [wl("inside", "10.200.0.9")],
        [cidr("range", "10.200.0.0/16")],
        kind=RouteKind.HBONE,
        next_hop="10.200.0.9:15008",
        authority="10.200.0.9:8080",
        identities=(sid("inside"),),
    ),
    Case(
        "cidr vip with a waypoint goes to the waypoint with the original address",
        "10.200.0.7:80",
        [waypoint, wl("server", "10.0.0.2", services=member("range"))],
        [waypoint_svc, cidr("range", "10.200.0.0/16", waypoint=WAYPOINT_GW)],
        kind=RouteKind.HBONE,
        next_hop="10.0.0.100:15008",
        authority="10.200.0.7:80",
        identities=(sid("waypoint"),),
        via_waypoint=True,
        service="range",
    ),
    Case(
        "cidr vip without a healthy endpoint has no upstream",
        "10.200.0.7:80",
        [],
        [cidr("range", "10.200.0.0/16")],
        error=NoHealthyUpstream,
    ),
]


def _addr(text: str) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]:
    host, _, port = text.rpartition(":")
    return ip(host.strip("[]")), int(port)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_build_request(case: Case) -> None:
    state = ProxyState()
    state.apply(
        UpdateBatch(workloads=(case.source, *case.workloads), services=tuple(case.services))
    )

    def call() -> Route:
        return route_outbound(
            state, case.source, ip(case.source_ip), _addr(case.target), rng=random.Random(1)
        )

    if case.error is not None:
        with pytest.raises(case.error):
            call()
        return
    route = call()
    assert route.kind is case.kind
    assert route.next_hop == _addr(case.next_hop or "")
    assert route.authority == case.authority
    assert route.identities == tuple(Identity.parse(i) for i in case.identities)
    assert route.via_waypoint is case.via_waypoint
    assert (route.destination_service.name if route.destination_service else None) == case.service


def test_endpoint_choice_is_weighted_by_capacity() -> None:
    state = ProxyState()
    heavy = wl("heavy", "10.0.0.2", services=member("echo"), capacity=3)
    light = wl("light", "10.0.0.3", services=member("echo"), capacity=1)
    state.apply(UpdateBatch(workloads=(SOURCE, heavy, light), services=(svc("echo", "10.96.0.1"),)))
    rng = random.Random(42)
    picks: Counter[str] = Counter()
    for _ in range(4000):
        route = route_outbound(state, SOURCE, ip("10.0.0.1"), (ip("10.96.0.1"), 80), rng=rng)
        assert route.destination_workload is not None
        picks[route.destination_workload.name] += 1
    assert 2700 < picks["heavy"] < 3300 and picks["heavy"] + picks["light"] == 4000


def test_choice_is_reproducible_with_the_same_seed() -> None:
    state = ProxyState()
    pods = [wl(f"p{i}", f"10.0.0.{i + 10}", services=member("echo")) for i in range(5)]
    state.apply(UpdateBatch(workloads=(SOURCE, *pods), services=(svc("echo", "10.96.0.1"),)))

    def seq(seed: int) -> list[Route]:
        rng = random.Random(seed)
        return [
            route_outbound(state, SOURCE, ip("10.0.0.1"), (ip("10.96.0.1"), 80), rng=rng)
            for _ in range(10)
        ]

    assert seq(3) == seq(3)
    assert len({r.next_hop for r in seq(3)}) > 1


def test_unaddressable_workload_by_ip_is_invalid() -> None:
    state = ProxyState()
    server = wl("server", "10.0.0.2")
    state.apply(UpdateBatch(workloads=(SOURCE, server)))
    # A workload reached through a waypoint that has lost its IPs.
    wp = wl("waypoint", None, hostname="waypoint.default.svc.cluster.local")
    target = replace(
        server,
        waypoint=GatewayAddress(
            destination=NamespacedHostname("default", "waypoint.default.svc.cluster.local")
        ),
    )
    state.apply(UpdateBatch(workloads=(target, wp)))
    with pytest.raises(NoValidDestination):
        route_outbound(state, SOURCE, ip("10.0.0.1"), (ip("10.0.0.2"), 80), rng=random.Random(0))


@pytest.mark.parametrize("protocol", [InboundProtocol.TCP, InboundProtocol.HBONE])
def test_hostname_workload_is_resolved_on_demand(protocol: InboundProtocol) -> None:
    """A ServiceEntry with ``resolution: DNS``: its endpoint has a hostname and no IP."""
    state = ProxyState()
    vm = wl(
        "vm", None, services=member("ext", {443: 8443}), hostname="vm.example", protocol=protocol
    )
    state.apply(
        UpdateBatch(
            workloads=(SOURCE, vm), services=(svc("ext", "240.240.0.1", ports={443: 8443}),)
        )
    )
    route = route_outbound(
        state, SOURCE, ip("10.0.0.1"), (ip("240.240.0.1"), 443), rng=random.Random(0)
    )
    assert route.resolve_hostname == "vm.example"
    assert route.destination_workload == vm
    resolved = route.resolved(ip("192.0.2.9"))
    assert resolved.resolve_hostname == ""
    if protocol is InboundProtocol.HBONE:
        assert resolved.next_hop == (ip("192.0.2.9"), 15008)
        assert resolved.authority == "192.0.2.9:8443"
    else:
        assert resolved.next_hop == (ip("192.0.2.9"), 8443)
        assert resolved.authority is None


def test_routes_to_addressed_workloads_need_no_resolution() -> None:
    state = ProxyState()
    server = wl("server", "10.0.0.2")
    state.apply(UpdateBatch(workloads=(SOURCE, server)))
    route = route_outbound(
        state, SOURCE, ip("10.0.0.1"), (ip("10.0.0.2"), 80), rng=random.Random(0)
    )
    assert route.resolve_hostname == ""


# --------------------------------------------------------------------------- weighted waypoints

PRIMARY = GatewayAddress(destination=NetworkAddress("", ip("10.0.0.100")))
CANARY = GatewayAddress(destination=NetworkAddress("", ip("10.0.0.101")))
canary = wl("canary", "10.0.0.101")


def weighted(
    *pairs: tuple[GatewayAddress, int], primary: GatewayAddress | None = PRIMARY
) -> Service:
    return svc(
        "echo",
        "10.96.0.1",
        waypoint=primary,
        weighted_waypoints=tuple(WeightedWaypoint(gw, w) for gw, w in pairs),
    )


def test_sample_weighted_waypoint_follows_ztunnel() -> None:
    rng = random.Random(0)
    assert sample_weighted_waypoint(weighted(), rng) is None  # empty: the caller uses `waypoint`
    primary_only = weighted((PRIMARY, 100), (CANARY, 0))
    assert {sample_weighted_waypoint(primary_only, rng) for _ in range(50)} == {PRIMARY}
    canary_only = weighted((PRIMARY, 0), (CANARY, 100))
    assert {sample_weighted_waypoint(canary_only, rng) for _ in range(50)} == {CANARY}
    assert sample_weighted_waypoint(weighted((PRIMARY, 0), (CANARY, 0)), rng) is None
    split = weighted((PRIMARY, 75), (CANARY, 25))
    # A fixed seed, so the count does not vary; the asymmetric split would show a swapped or
    # ignored weight.
    counts = Counter(sample_weighted_waypoint(split, rng) for _ in range(10_000))
    assert 7_000 < counts[PRIMARY] < 8_000 and counts[PRIMARY] + counts[CANARY] == 10_000


def _route_via(service: Service, seed: int) -> Route:
    state = ProxyState()
    state.apply(
        UpdateBatch(
            workloads=(SOURCE, waypoint, canary, wl("server", "10.0.0.2", services=member("echo"))),
            services=(service,),
        )
    )
    return route_outbound(
        state, SOURCE, ip("10.0.0.1"), _addr("10.96.0.1:80"), rng=random.Random(seed)
    )


def test_weighted_waypoints_split_connections_between_waypoints() -> None:
    service = weighted((PRIMARY, 50), (CANARY, 50))
    hops = Counter(_route_via(service, seed).next_hop for seed in range(40))
    assert set(hops) == {_addr("10.0.0.100:15008"), _addr("10.0.0.101:15008")}
    route = _route_via(weighted((PRIMARY, 0), (CANARY, 1)), 3)
    assert route.via_waypoint and route.next_hop == _addr("10.0.0.101:15008")
    assert route.authority == "10.96.0.1:80"  # the original VIP, as for the primary
    assert route.identities == (Identity.parse(sid("canary")),)


def test_all_zero_weights_fall_back_to_the_primary_waypoint() -> None:
    route = _route_via(weighted((PRIMARY, 0), (CANARY, 0)), 1)
    assert route.next_hop == _addr("10.0.0.100:15008")
    # Without a primary, all-zero weights mean no waypoint at all: straight to the endpoint.
    direct = _route_via(weighted((PRIMARY, 0), (CANARY, 0), primary=None), 1)
    assert not direct.via_waypoint and direct.next_hop == _addr("10.0.0.2:15008")
