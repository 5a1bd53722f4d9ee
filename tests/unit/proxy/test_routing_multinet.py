"""Multi-network routing (ztunnel's ``build_request_through_gateway`` and its tests): which
endpoint, which gateway, which identities, or which error."""

from __future__ import annotations

import ipaddress
import random
from dataclasses import replace

import pytest

from ztunnel_py.identity.spiffe import Identity
from ztunnel_py.proxy.routing import (
    NoHealthyUpstream,
    NoService,
    NoValidDestination,
    Route,
    RouteKind,
    UnknownNetworkGateway,
    route_outbound,
)
from ztunnel_py.state.model import (
    GatewayAddress,
    HealthStatus,
    InboundProtocol,
    LoadBalancer,
    LoadBalancerMode,
    LoadBalancerScope,
    NamespacedHostname,
    NetworkAddress,
    Service,
    Workload,
)
from ztunnel_py.state.store import ProxyState, UpdateBatch

ip = ipaddress.ip_address
ECHO_KEY = "default/echo.default.svc.cluster.local"
REMOTE_SAN = "spiffe://cluster.local/ns/default/sa/remote-echo"
GATEWAY_ID = "spiffe://cluster.local/ns/istio-system/sa/eastwest"
# istiod's gateway reference for network "remote": the gateway's IP on that network
GW_BY_IP = GatewayAddress(
    destination=NetworkAddress("remote", ip("10.22.1.1")), hbone_mtls_port=15009
)
GW_BY_NAME = GatewayAddress(
    destination=NamespacedHostname("istio-system", "eastwest.istio-system.svc.cluster.local"),
    hbone_mtls_port=15008,
)


def wl(name: str, addr: str | None, *, network: str = "", **kw: object) -> Workload:
    return Workload(
        uid=f"Kubernetes//Pod/default/{name}",
        name=name,
        namespace=kw.pop("namespace", "default"),  # type: ignore[arg-type]
        service_account=kw.pop("sa", name),  # type: ignore[arg-type]
        workload_ips=(ip(addr),) if addr else (),
        network=network,
        protocol=kw.pop("protocol", InboundProtocol.HBONE),  # type: ignore[arg-type]
        **kw,  # type: ignore[arg-type]
    )


def echo(**kw: object) -> Service:
    return Service(
        name="echo",
        namespace="default",
        hostname="echo.default.svc.cluster.local",
        vips=(NetworkAddress("", ip("10.96.0.3")),),
        ports={80: 8080},
        subject_alt_names=(REMOTE_SAN,),
        **kw,  # type: ignore[arg-type]
    )


SOURCE = wl("client", "10.0.0.1")
ECHO_PORTS = {ECHO_KEY: {80: 8080}}
# istiod's split-horizon workload: the remote endpoints behind one gateway, without address
REMOTE = wl("remote-echo", None, network="remote", network_gateway=GW_BY_IP, services=ECHO_PORTS)
GATEWAY = wl(
    "eastwest",
    "10.22.1.1",
    network="remote",
    namespace="istio-system",
    protocol=InboundProtocol.TCP,
)


def route(*workloads: Workload, services: tuple[Service, ...] = (echo(),), seed: int = 1) -> Route:
    state = ProxyState()
    state.apply(UpdateBatch(workloads=(SOURCE, *workloads), services=services))
    return route_outbound(
        state, SOURCE, ip("10.0.0.1"), (ip("10.96.0.3"), 80), rng=random.Random(seed)
    )


def test_remote_endpoint_goes_through_the_gateway_named_by_address() -> None:
    r = route(REMOTE, GATEWAY)
    assert r.kind is RouteKind.DOUBLE_HBONE
    assert r.next_hop == (ip("10.22.1.1"), 15009)  # the gateway's IP, hbone_mtls_port
    assert r.authority == "echo.default.svc.cluster.local:80"  # service name, service port
    assert r.identities == (Identity.parse(GATEWAY_ID),)  # the outer tunnel proves the gateway
    assert r.inner_identities == (Identity.parse(REMOTE_SAN),)  # the inner one, the service
    assert r.destination_workload == GATEWAY
    assert r.destination_service is not None and r.destination_service.name == "echo"


def test_remote_endpoint_with_an_address_still_goes_through_its_gateway() -> None:
    remote = replace(REMOTE, workload_ips=(ip("10.1.0.2"),))
    r = route(remote, GATEWAY)
    assert r.kind is RouteKind.DOUBLE_HBONE and r.next_hop == (ip("10.22.1.1"), 15009)


def test_gateway_named_by_hostname_is_load_balanced_on_its_service_port() -> None:
    gw_svc = Service(
        name="eastwest",
        namespace="istio-system",
        hostname="eastwest.istio-system.svc.cluster.local",
        vips=(NetworkAddress("", ip("10.96.0.4")),),
        ports={15008: 15008},
    )
    gw_pod = replace(
        GATEWAY,
        workload_ips=(ip("127.0.0.5"),),
        services={f"istio-system/{gw_svc.hostname}": {15008: 15008}},
    )
    remote = replace(REMOTE, network_gateway=GW_BY_NAME)
    r = route(remote, gw_pod, services=(echo(), gw_svc))
    assert r.kind is RouteKind.DOUBLE_HBONE
    assert r.next_hop == (ip("127.0.0.5"), 15008)
    assert r.authority == "echo.default.svc.cluster.local:80"


def test_gateway_workload_known_only_by_hostname_is_resolved_on_demand() -> None:
    """istiod's gateway workload for a gateway whose address is a DNS name."""
    by_dns = GatewayAddress(
        destination=NamespacedHostname("istio-system", "ew.example.com"), hbone_mtls_port=15008
    )
    gw = replace(GATEWAY, workload_ips=(), hostname="ew.example.com")
    r = route(replace(REMOTE, network_gateway=by_dns), gw)
    assert r.kind is RouteKind.DOUBLE_HBONE and r.resolve_hostname == "ew.example.com"
    resolved = r.resolved(ip("192.0.2.7"))
    assert resolved.next_hop == (ip("192.0.2.7"), 15008)
    assert resolved.authority == "echo.default.svc.cluster.local:80"  # not the gateway's IP


def test_remote_waypoint_is_reached_through_its_gateway_with_the_service_authority() -> None:
    wp_svc = Service(
        name="waypoint",
        namespace="default",
        hostname="waypoint.default.svc.cluster.local",
        vips=(NetworkAddress("", ip("10.96.0.4")),),
        ports={15008: 15008},
        subject_alt_names=("spiffe://cluster.local/ns/default/sa/waypoint",),
    )
    remote_wp = wl(
        "remote-waypoint",
        None,
        network="remote",
        network_gateway=GW_BY_IP,
        services={f"default/{wp_svc.hostname}": {15008: 15008}},
    )
    waypoint = GatewayAddress(destination=NamespacedHostname("default", wp_svc.hostname))
    r = route(remote_wp, GATEWAY, services=(echo(waypoint=waypoint), wp_svc))
    assert r.kind is RouteKind.DOUBLE_HBONE
    assert r.next_hop == (ip("10.22.1.1"), 15009)
    assert r.authority == "echo.default.svc.cluster.local:80"
    # the inner tunnel ends at the waypoint: its service's SANs
    assert r.inner_identities == (Identity.parse("spiffe://cluster.local/ns/default/sa/waypoint"),)
    assert r.via_waypoint


FAILOVER = LoadBalancer(
    routing_preferences=(LoadBalancerScope.NETWORK,), mode=LoadBalancerMode.FAILOVER
)


@pytest.mark.parametrize(
    ("local_status", "kind"),
    [(HealthStatus.HEALTHY, RouteKind.HBONE), (HealthStatus.UNHEALTHY, RouteKind.DOUBLE_HBONE)],
)
def test_failover_prefers_the_local_network_then_the_remote_one(
    local_status: HealthStatus, kind: RouteKind
) -> None:
    local = wl("local-echo", "10.0.0.2", services=ECHO_PORTS, status=local_status)
    for seed in range(20):  # ranking, not chance: every draw agrees
        r = route(local, REMOTE, GATEWAY, services=(echo(load_balancer=FAILOVER),), seed=seed)
        assert r.kind is kind


def test_standard_load_balancing_mixes_local_and_remote_endpoints_by_capacity() -> None:
    local = wl("local-echo", "10.0.0.2", services=ECHO_PORTS)
    remote = replace(REMOTE, capacity=3)  # istiod: capacity = the remote endpoints' count
    kinds = {route(local, remote, GATEWAY, seed=s).kind for s in range(40)}
    assert kinds == {RouteKind.HBONE, RouteKind.DOUBLE_HBONE}


def test_addressless_endpoint_on_our_own_network_is_never_used() -> None:
    """The workload list is the same on every network: a gateway is named even for local
    workloads, and must not be used for them."""
    local_gw = replace(REMOTE, network="")
    with pytest.raises(NoHealthyUpstream):
        route(local_gw, GATEWAY)


def test_remote_endpoint_without_a_gateway_is_no_valid_destination() -> None:
    with pytest.raises(NoValidDestination, match="has no network gateway"):
        route(replace(REMOTE, workload_ips=(ip("10.1.0.2"),), network_gateway=None), GATEWAY)


def test_unknown_gateway_address_is_a_clear_error() -> None:
    with pytest.raises(UnknownNetworkGateway, match=r"unknown network gateway: .*remote/10\.22"):
        route(REMOTE)  # the gateway workload is not in the state


def test_gateway_on_the_wrong_network_is_not_found() -> None:
    """A gateway address is looked up on the gateway's own network only."""
    with pytest.raises(UnknownNetworkGateway):
        route(REMOTE, replace(GATEWAY, network="elsewhere"))


def test_unknown_gateway_hostname_is_a_clear_error() -> None:
    with pytest.raises(UnknownNetworkGateway, match=r"eastwest\.istio-system"):
        route(replace(REMOTE, network_gateway=GW_BY_NAME), GATEWAY)


def test_remote_workload_addressed_by_ip_is_no_service() -> None:
    state = ProxyState()
    remote = wl("remote-pod", "10.0.0.9", network="remote", network_gateway=GW_BY_IP)
    # The source sits on another network than the daemon looks addresses up in.
    state.apply(UpdateBatch(workloads=(SOURCE, remote, GATEWAY)))
    with pytest.raises(NoService, match="no service for target address"):
        route_outbound(
            state,
            SOURCE,
            ip("10.0.0.1"),
            (ip("10.0.0.9"), 80),
            rng=random.Random(0),
            network="remote",
        )
