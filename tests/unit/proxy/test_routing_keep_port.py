"""``TRANSPARENT_NETWORK_POLICIES``: HBONE straight to another pod dials the target port;
waypoints, the pod itself and the proxy's own ports keep 15008."""

from __future__ import annotations

import ipaddress
import random

from ztunnel_py.proxy.routing import RouteKind, route_outbound
from ztunnel_py.state.model import GatewayAddress, InboundProtocol, NetworkAddress, Workload
from ztunnel_py.state.store import ProxyState, UpdateBatch

ip = ipaddress.ip_address


def _wl(name: str, addr: str, **kw: object) -> Workload:
    return Workload(
        uid=f"c//Pod/default/{name}",
        name=name,
        namespace="default",
        service_account=name,
        workload_ips=(ip(addr),),
        protocol=InboundProtocol.HBONE,
        **kw,  # type: ignore[arg-type]
    )


CLIENT = _wl("client", "10.0.0.1")
SERVER = _wl("server", "10.0.0.2")
WAYPOINT = _wl("waypoint", "10.0.0.9")
BEHIND = _wl(
    "behind", "10.0.0.3", waypoint=GatewayAddress(destination=NetworkAddress("", ip("10.0.0.9")))
)


def _route(target: str, port: int, *, keep_port: bool) -> tuple[RouteKind, str]:
    state = ProxyState()
    state.apply(UpdateBatch(workloads=(CLIENT, SERVER, WAYPOINT, BEHIND)))
    route = route_outbound(
        state, CLIENT, ip("10.0.0.1"), (ip(target), port), rng=random.Random(1), keep_port=keep_port
    )
    return route.kind, f"{route.next_hop[0]}:{route.next_hop[1]}"


def test_direct_hbone_keeps_the_target_port_only_when_asked() -> None:
    assert _route("10.0.0.2", 9000, keep_port=True) == (RouteKind.HBONE, "10.0.0.2:9000")
    assert _route("10.0.0.2", 9000, keep_port=False) == (RouteKind.HBONE, "10.0.0.2:15008")


def test_waypoints_self_calls_and_proxy_ports_keep_15008() -> None:
    assert _route("10.0.0.3", 9000, keep_port=True) == (RouteKind.HBONE, "10.0.0.9:15008")
    assert _route("10.0.0.1", 9000, keep_port=True) == (RouteKind.HBONE, "10.0.0.1:15008")
    assert _route("10.0.0.2", 15006, keep_port=True) == (RouteKind.HBONE, "10.0.0.2:15008")
