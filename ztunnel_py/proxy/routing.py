"""Where an outbound connection goes: ztunnel's ``OutboundConnection::build_request``. Pure.

Given the mesh state, the source workload and the original destination, ``route_outbound``
answers with a ``Route``: HBONE to a pod's (or waypoint's) :15008 with the ``:authority`` and
the identities the next hop must prove, plain TCP to a pod outside the mesh, or passthrough
to the original destination. Load balancing draws from an injected ``random.Random``.

The steps (reference 4.3):

1. The destination IP is looked up as a workload first, then as a service VIP (preferring the
   client's namespace), then in the services' CIDR VIPs, the longest prefix winning
   (``ProxyState.service_by_vip``).
2. A service with a waypoint goes to the waypoint, ``:authority`` = the original VIP:port;
   with weighted waypoints (a canary split) one is sampled per connection by weight.
3. Otherwise an endpoint is chosen (capacity-weighted; FAILOVER/STRICT rank by locality;
   unhealthy endpoints only with ALLOW_ALL) and the service port is mapped to its target port.
   A service with no usable endpoint is ``NoHealthyUpstream`` unless it is PASSTHROUGH.
4. A workload-addressed destination with a waypoint goes to that waypoint, unless the source
   is that waypoint.
5. HBONE workloads get HBONE to ``<ip>:15008``; others plain TCP; unknown IPs pass through.
   A workload with only a hostname (ServiceEntry ``resolution: DNS``) gets a route marked
   ``resolve_hostname``: the adapter looks the name up on demand (ztunnel's on-demand DNS).

6. An upstream on another network than the source (an endpoint, or the service's waypoint)
   is reached through its ``network_gateway`` by double HBONE (``RouteKind.DOUBLE_HBONE``):
   the outer CONNECT goes to the gateway (found by address on the gateway's network, or by
   hostname) and proves the gateway's identity; the inner one, carried inside it, proves the
   service's ``subject_alt_names``. Both name ``<service hostname>:<service port>``. Only
   service-addressed traffic may cross networks (``NoService`` otherwise). An endpoint with
   no address counts in load balancing only when it is on another network and has a gateway
   (istiod's split-horizon workloads). See docs/multi-network.md.
"""

from __future__ import annotations

import dataclasses
import enum
import ipaddress
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import overload

from ztunnel_py.config import PORT_HBONE
from ztunnel_py.errors import ZtunnelError
from ztunnel_py.hbone.headers import format_authority
from ztunnel_py.identity.errors import InvalidSpiffeId
from ztunnel_py.identity.spiffe import Identity
from ztunnel_py.state.model import (
    Endpoint,
    GatewayAddress,
    HealthStatus,
    InboundProtocol,
    IPAddress,
    LoadBalancerHealthPolicy,
    LoadBalancerMode,
    LoadBalancerScope,
    NamespacedHostname,
    NetworkAddress,
    Service,
    Workload,
)
from ztunnel_py.state.node_identities import workload_identity
from ztunnel_py.state.store import ProxyState

SocketAddr = tuple[IPAddress, int]


class RouteKind(enum.Enum):
    HBONE = "HBONE"  # mTLS + CONNECT to the next hop's :15008
    TCP = "TCP"  # plain TCP to a known workload that is not in the mesh
    PASSTHROUGH = "PASSTHROUGH"  # plain TCP to the original destination, nothing known
    # HBONE inside HBONE: the outer tunnel to a network gateway, the inner one to the service
    DOUBLE_HBONE = "DOUBLEHBONE"


@dataclass(frozen=True, slots=True, kw_only=True)
class Route:
    kind: RouteKind
    #: Where to connect: ``<pod ip>:15008`` for HBONE, the target itself otherwise.
    next_hop: SocketAddr
    #: ``:authority`` of the CONNECT (HBONE only).
    authority: str | None = None
    #: Identities the next hop's certificate may carry (HBONE only; the gateway's for
    #: double HBONE).
    identities: tuple[Identity, ...] = ()
    #: Double HBONE: identities the final hop may prove inside the gateway's tunnel (the
    #: service's ``subject_alt_names``, ztunnel's ``final_sans``).
    inner_identities: tuple[Identity, ...] = ()
    #: The workload at the next hop (the waypoint when going through one).
    destination_workload: Workload | None = None
    #: The service the client addressed, if any (``forwarded: ...;host=``, telemetry).
    destination_service: Service | None = None
    via_waypoint: bool = False
    #: A hostname-only workload (a ServiceEntry with ``resolution: DNS``): its address is
    #: looked up on demand, then ``resolved`` gives the route to use.
    resolve_hostname: str = ""
    #: The port behind the next hop (the ``:authority`` port once the hostname is resolved).
    target_port: int = 0

    def resolved(self, ip: IPAddress) -> Route:
        """The route once ``resolve_hostname`` has been looked up and ``ip`` chosen."""
        if self.kind is RouteKind.DOUBLE_HBONE:
            authority = self.authority  # the service name: only the gateway was resolved
        elif self.kind is RouteKind.HBONE:
            authority = format_authority(ip, self.target_port)
        else:
            authority = None
        return dataclasses.replace(
            self, next_hop=(ip, self.next_hop[1]), authority=authority, resolve_hostname=""
        )


class RoutingError(ZtunnelError):
    """No route: the connection is refused (the client sees a reset)."""


class NoHealthyUpstream(RoutingError):
    def __init__(self, target: SocketAddr) -> None:
        self.target = target
        super().__init__(
            f"no healthy upstream for {format_authority(*target)}: the service has no endpoint"
            " that is healthy and serves this port"
        )


class NoValidDestination(RoutingError):
    def __init__(self, workload: Workload, why: str) -> None:
        self.workload = workload
        super().__init__(f"workload {workload.uid} cannot be reached: {why}")


class UnknownWaypoint(RoutingError):
    def __init__(self, waypoint: GatewayAddress) -> None:
        self.waypoint = waypoint
        super().__init__(f"waypoint {waypoint.destination} not found in the mesh state")


class UnknownNetworkGateway(RoutingError):
    """ztunnel's ``UnknownNetworkGateway``: the gateway of a remote endpoint is not in the
    mesh state (or has no usable address)."""

    def __init__(self, gateway: GatewayAddress, network: str) -> None:
        self.gateway = gateway
        self.network = network
        super().__init__(
            f"unknown network gateway: network gateway {gateway.destination}"
            f" (port {gateway.hbone_mtls_port}) of network {network!r} not found: istiod must"
            " send the gateway as a workload or service (check the east-west gateway's"
            " topology.istio.io/network label and its address)"
        )


class NoService(RoutingError):
    """ztunnel's ``NoService``: a workload on another network addressed by its IP; only
    service-addressed traffic crosses networks."""

    def __init__(self, target: SocketAddr, network: str) -> None:
        self.target = target
        super().__init__(
            f"no service for target address: {format_authority(*target)} is a workload on"
            f" network {network!r}; another network is reached only through a service"
        )


@dataclass(frozen=True, slots=True)
class _Upstream:
    workload: Workload
    port: int
    service: Service | None


def route_outbound(
    state: ProxyState,
    source: Workload,
    source_ip: IPAddress,
    target: SocketAddr,
    *,
    rng: random.Random,
    network: str = "",
    hbone_port: int = PORT_HBONE,
) -> Route:
    """The route for a connection from ``source`` (at ``source_ip``) to ``target``."""
    target_ip, target_port = target
    address = state.find_address(
        NetworkAddress(network, target_ip), prefer_namespace=source.namespace
    )
    service = address if isinstance(address, Service) else None

    if service is not None:
        waypoint = sample_weighted_waypoint(service, rng) or service.waypoint
        if waypoint is not None:
            via = _resolve_waypoint(state, waypoint, source, target, rng)
            if via.workload.network != source.network:
                return _through_gateway(state, source, via, service, target, rng)
            return _waypoint_route(via, source, target, service, hbone_port)
        lb = service.load_balancer
        if lb is not None and lb.mode is LoadBalancerMode.PASSTHROUGH:
            return Route(kind=RouteKind.PASSTHROUGH, next_hop=target)
        upstream = _upstream_from_service(state, source, service, target_port, rng, waypoint=False)
        if upstream is None:
            raise NoHealthyUpstream(target)
    elif isinstance(address, Workload):
        upstream = _Upstream(address, target_port, None)
    else:
        return Route(kind=RouteKind.PASSTHROUGH, next_hop=target)

    workload = upstream.workload
    if workload.network != source.network:
        if service is None:
            raise NoService(target, workload.network)
        return _through_gateway(state, source, upstream, service, target, rng)

    if (
        service is None
        and workload.waypoint is not None
        and not _source_is_waypoint(state, workload.waypoint, source, source_ip)
    ):
        via = _resolve_waypoint(state, workload.waypoint, source, target, rng)
        return _waypoint_route(via, source, target, None, hbone_port)

    ip = _pick_ip(workload, target_ip, resolvable=True)
    # A hostname-only workload: the adapter resolves it on demand (``Route.resolved``).
    hostname = ""
    if ip is None:
        hostname, ip = workload.hostname, _UNRESOLVED
    if workload.protocol is InboundProtocol.HBONE:
        return Route(
            kind=RouteKind.HBONE,
            next_hop=(ip, hbone_port),
            authority=format_authority(ip, upstream.port),
            identities=_identities(workload, upstream.service),
            destination_workload=workload,
            destination_service=upstream.service,
            resolve_hostname=hostname,
            target_port=upstream.port,
        )
    return Route(
        kind=RouteKind.TCP,
        next_hop=(ip, upstream.port),
        destination_workload=workload,
        destination_service=upstream.service,
        resolve_hostname=hostname,
        target_port=upstream.port,
    )


# --------------------------------------------------------------------------- waypoints


def _waypoint_route(
    via: _Upstream, source: Workload, target: SocketAddr, service: Service | None, hbone_port: int
) -> Route:
    waypoint = via.workload
    ip = _pick_ip(waypoint, target[0])
    return Route(
        kind=RouteKind.HBONE,
        next_hop=(ip, via.port or hbone_port),
        authority=format_authority(*target),  # the original VIP (or IP) and port
        identities=_identities(waypoint, via.service),
        destination_workload=waypoint,
        destination_service=service,
        via_waypoint=True,
    )


def sample_weighted_waypoint(service: Service, rng: random.Random) -> GatewayAddress | None:
    """ztunnel's ``sample_weighted_waypoint``: one of the service's weighted waypoints, in
    proportion to the weights (a zero weight is never chosen); ``None`` when the set is empty
    or no weight is positive, and the caller falls back to ``Service.waypoint``."""
    entries = service.weighted_waypoints
    weights = [max(w.weight, 0) for w in entries]
    if sum(weights) <= 0:
        return None
    return rng.choices(entries, weights=weights)[0].destination


def _resolve_waypoint(
    state: ProxyState,
    gateway: GatewayAddress,
    source: Workload,
    target: SocketAddr,
    rng: random.Random,
) -> _Upstream:
    dest = gateway.destination
    port = gateway.hbone_mtls_port
    if isinstance(dest, NamespacedHostname):
        svc = state.service(f"{dest.namespace}/{dest.hostname}")
        if svc is not None:
            found = _upstream_from_service(state, source, svc, port, rng, waypoint=True)
        else:
            workload = _workload_by_hostname(state, dest)
            found = _Upstream(workload, port, None) if workload is not None else None
    else:
        addr = state.find_address(dest)
        if isinstance(addr, Service):
            found = _upstream_from_service(state, source, addr, port, rng, waypoint=True)
        elif isinstance(addr, Workload):
            found = _Upstream(addr, port, None)
        else:
            found = None
    if found is None:
        raise UnknownWaypoint(gateway)
    return found


def is_waypoint_of(
    state: ProxyState, target: NetworkAddress, local: Workload, local_ip: IPAddress
) -> bool:
    """ztunnel's inbound "waypoint sandwich" check: does the HBONE target (a workload IP or a
    service VIP that is not this pod's) name this pod as its waypoint?

    The target's own waypoint is resolved as ztunnel's ``find_destination`` does; a waypoint
    service counts when this pod is one of its endpoints, a waypoint workload when the tunnel
    arrived on one of its IPs. Anything unknown is no.
    """
    found = state.find_address(target)
    gateway = found.waypoint if found is not None else None
    if gateway is None:
        return False
    waypoint = _find_destination(state, gateway.destination)
    if isinstance(waypoint, Service):
        return local.uid in state.endpoints(waypoint.key)
    if isinstance(waypoint, Workload):
        return local_ip in waypoint.workload_ips
    return False


def _find_destination(
    state: ProxyState, dest: NetworkAddress | NamespacedHostname
) -> Workload | Service | None:
    """ztunnel's ``find_destination``: an address, or a hostname (service first, then a
    workload with that hostname)."""
    if isinstance(dest, NetworkAddress):
        return state.find_address(dest)
    return state.service(f"{dest.namespace}/{dest.hostname}") or _workload_by_hostname(state, dest)


def _workload_by_hostname(state: ProxyState, name: NamespacedHostname) -> Workload | None:
    for w in state.workloads():
        if w.hostname == name.hostname and w.namespace == name.namespace:
            return w
    return None


def _source_is_waypoint(
    state: ProxyState, gateway: GatewayAddress, source: Workload, source_ip: IPAddress
) -> bool:
    """ztunnel's ``check_from_waypoint``: the source has the waypoint's identity and IP."""

    def is_waypoint(w: Workload) -> bool:
        return w.identity == source.identity and source_ip in w.workload_ips

    found = _find_destination(state, gateway.destination)
    if found is None:
        return False
    if isinstance(found, Workload):
        return is_waypoint(found)
    for ep in state.endpoints(found.key).values():
        workload = state.workload(ep.workload_uid)
        if workload is not None and is_waypoint(workload):
            return True
    return False


# --------------------------------------------------------------------------- network gateways


def _through_gateway(
    state: ProxyState,
    source: Workload,
    upstream: _Upstream,
    service: Service,
    target: SocketAddr,
    rng: random.Random,
) -> Route:
    """ztunnel's ``build_request_through_gateway``: double HBONE to ``upstream`` (a remote
    endpoint or waypoint) through its network gateway. Both CONNECTs name the service the
    client addressed, with the port it used; the gateway picks the endpoint."""
    gateway = upstream.workload.network_gateway
    if gateway is None:
        raise NoValidDestination(
            upstream.workload,
            f"it is on network {upstream.workload.network!r} and has no network gateway",
        )
    via = _resolve_network_gateway(state, gateway, upstream.workload.network, source, target, rng)
    ip = _pick_ip(via.workload, _gateway_target_ip(gateway, target), resolvable=True)
    hostname = ""
    if ip is None:
        hostname, ip = via.workload.hostname, _UNRESOLVED
    return Route(
        kind=RouteKind.DOUBLE_HBONE,
        next_hop=(ip, via.port),
        authority=format_authority(service.hostname, target[1]),
        identities=_identities(via.workload, via.service),
        inner_identities=service_sans(upstream.service),
        destination_workload=via.workload,
        destination_service=service,
        via_waypoint=upstream.service is not service,
        resolve_hostname=hostname,
        target_port=via.port,
    )


def _gateway_target_ip(gateway: GatewayAddress, target: SocketAddr) -> IPAddress:
    """The address a gateway's IP is picked against: the gateway's own when it is named by
    address, else the original destination (so the caller's IP family is kept)."""
    dest = gateway.destination
    return dest.address if isinstance(dest, NetworkAddress) else target[0]


def _resolve_network_gateway(
    state: ProxyState,
    gateway: GatewayAddress,
    network: str,
    source: Workload,
    target: SocketAddr,
    rng: random.Random,
) -> _Upstream:
    """ztunnel's ``fetch_network_gateway``: a gateway named by address is looked up on its
    own network (a service VIP first, load balanced on ``hbone_mtls_port``, then a
    workload); one named by hostname is a service or a workload with that hostname."""
    dest = gateway.destination
    port = gateway.hbone_mtls_port
    found: _Upstream | None = None
    address: Workload | Service | None
    if isinstance(dest, NetworkAddress):  # ztunnel's find_upstream: a VIP before a workload
        ns = source.namespace
        address = state.service_by_vip(dest, prefer_namespace=ns) or state.workload_by_address(dest)
    else:
        address = _find_destination(state, dest)
    if isinstance(address, Service):
        lb = address.load_balancer
        if lb is None or lb.mode is not LoadBalancerMode.PASSTHROUGH:
            found = _upstream_from_service(state, source, address, port, rng, waypoint=False)
    elif isinstance(address, Workload):
        found = _Upstream(address, port, None)
    if found is None or not (found.workload.workload_ips or found.workload.hostname):
        raise UnknownNetworkGateway(gateway, network)
    return found


def service_sans(service: Service | None) -> tuple[Identity, ...]:
    """ztunnel's ``Upstream::service_sans``: the service's SANs that are SPIFFE ids."""
    ids: list[Identity] = []
    for san in service.subject_alt_names if service is not None else ():
        try:
            ids.append(Identity.parse(san))
        except InvalidSpiffeId:
            continue  # ztunnel ignores SANs that are not SPIFFE ids
    return tuple(ids)


# --------------------------------------------------------------------------- load balancing


def _upstream_from_service(
    state: ProxyState,
    source: Workload,
    service: Service,
    service_port: int,
    rng: random.Random,
    *,
    waypoint: bool,
) -> _Upstream | None:
    picked = _load_balance(state, source, service, service_port, rng, waypoint=waypoint)
    if picked is None:
        return None
    endpoint, workload = picked
    service_target = service.ports.get(service_port, 0)
    if endpoint.ports.get(service_port):
        port = endpoint.ports[service_port]  # the workload's own mapping wins
    elif service_target > 0:
        port = service_target
    elif workload.application_tunnel is not None and workload.application_tunnel.port:
        port = service_port
    else:
        return None
    return _Upstream(workload, port, service)


def _load_balance(
    state: ProxyState,
    source: Workload,
    service: Service,
    service_port: int,
    rng: random.Random,
    *,
    waypoint: bool,
) -> tuple[Endpoint, Workload] | None:
    target_port = service.ports.get(service_port)
    if not waypoint and target_port is None:
        return None  # the service has no such port
    lb = service.load_balancer
    allow_unhealthy = lb is not None and lb.health_policy is LoadBalancerHealthPolicy.ALLOW_ALL
    candidates: list[tuple[Endpoint, Workload]] = []
    for endpoint in state.endpoints(service.key).values():
        workload = state.workload(endpoint.workload_uid)
        if workload is None:
            continue
        if workload.status is not HealthStatus.HEALTHY and not allow_unhealthy:
            continue
        if not (workload.workload_ips or workload.hostname) and not _gateway_only(source, workload):
            continue
        if waypoint:
            if target_port is None and workload.application_tunnel is None:
                continue
        elif not target_port and not endpoint.ports.get(service_port):
            continue  # target port 0 and the workload does not list this port
        candidates.append((endpoint, workload))
    if lb is not None and lb.mode in (LoadBalancerMode.FAILOVER, LoadBalancerMode.STRICT):
        candidates = _rank(source, candidates, lb.routing_preferences, lb.mode)
    return _weighted_choice(candidates, rng)


def _gateway_only(source: Workload, workload: Workload) -> bool:
    """A workload without an address is reachable only through its network gateway; the
    workload list is the same on every network, so a gateway is named even for a local
    workload: never use it there."""
    return workload.network != source.network and workload.network_gateway is not None


def _rank(
    source: Workload,
    candidates: list[tuple[Endpoint, Workload]],
    scopes: Sequence[LoadBalancerScope],
    mode: LoadBalancerMode,
) -> list[tuple[Endpoint, Workload]]:
    network_first = bool(scopes) and scopes[0] is LoadBalancerScope.NETWORK
    ranked: list[tuple[int, Endpoint, Workload]] = []
    for endpoint, workload in candidates:
        rank = 0
        adjust = 0
        for scope in scopes:
            if scope is LoadBalancerScope.NETWORK:
                same = source.network == workload.network
                if network_first:
                    if not same:
                        continue  # a network mismatch does not stop the other scopes
                    adjust = len(scopes) - 1
            else:
                same = _same_scope(scope, source, workload)
            if not same:
                break
            rank += 1
        if mode is LoadBalancerMode.STRICT and rank != len(scopes):
            continue
        ranked.append((rank + adjust, endpoint, workload))
    if not ranked:
        return []
    best = max(r for r, _, _ in ranked)
    return [(e, w) for r, e, w in ranked if r == best]


def _same_scope(scope: LoadBalancerScope, a: Workload, b: Workload) -> bool:
    if scope is LoadBalancerScope.REGION:
        return a.locality.region == b.locality.region
    if scope is LoadBalancerScope.ZONE:
        return a.locality.zone == b.locality.zone
    if scope is LoadBalancerScope.SUBZONE:
        return a.locality.subzone == b.locality.subzone
    if scope is LoadBalancerScope.NODE:
        return a.node == b.node
    if scope is LoadBalancerScope.CLUSTER:
        return a.cluster_id == b.cluster_id
    return a.network == b.network


def _weighted_choice(
    candidates: list[tuple[Endpoint, Workload]], rng: random.Random
) -> tuple[Endpoint, Workload] | None:
    if not candidates:
        return None
    weights = [max(w.capacity, 0) for _, w in candidates]
    total = sum(weights)
    if total <= 0:
        return None
    point = rng.random() * total
    for candidate, weight in zip(candidates, weights, strict=True):
        point -= weight
        if point < 0:
            return candidate
    return candidates[-1]


# --------------------------------------------------------------------------- helpers


_UNRESOLVED = ipaddress.IPv4Address(0)  # the next hop of a route still to be resolved


@overload
def _pick_ip(workload: Workload, target_ip: IPAddress) -> IPAddress: ...
@overload
def _pick_ip(workload: Workload, target_ip: IPAddress, *, resolvable: bool) -> IPAddress | None: ...
def _pick_ip(
    workload: Workload, target_ip: IPAddress, *, resolvable: bool = False
) -> IPAddress | None:
    """A workload IP of the target's family when there is one (ztunnel's family matching);
    ``None`` for a hostname-only workload when the caller can resolve it on demand."""
    if not workload.workload_ips:
        if resolvable and workload.hostname:
            return None
        raise NoValidDestination(workload, "it has no IP address")
    for ip in workload.workload_ips:
        if ip.version == target_ip.version:
            return ip
    return workload.workload_ips[0]


def _identities(workload: Workload, service: Service | None) -> tuple[Identity, ...]:
    """ztunnel's ``workload_and_services_san``: service SANs, then the workload identity."""
    ids = list(service_sans(service))
    own = workload_identity(workload)
    if own not in ids:
        ids.append(own)
    return tuple(ids)
