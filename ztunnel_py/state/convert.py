"""istiod's protobuf resources into our model types (the only state module that sees protobuf).

Each function takes the xDS resource name (for error messages) and one decoded message and
returns a model object, or raises ``ConversionError(name, reason)``, which the xDS session turns
into one ``name: reason`` entry of a NACK. The rules are ztunnel's (``TryFrom<XdsWorkload>``,
``TryFrom<&XdsService>``, ``TryFrom<XdsRbac>``):

- empty ``trust_domain`` / ``service_account`` / ``cluster_id`` become ``cluster.local`` /
  ``default`` / ``Kubernetes``; an unset ``capacity`` is 1;
- IPs are raw 4- or 16-byte strings; any other length is an error;
- ``TunnelProtocol.LEGACY_ISTIO_MTLS`` and unknown values of the enums ztunnel parses strictly
  are errors. Two enums fail open as in ztunnel: an unknown ``Service.visibility`` is PUBLIC and
  an unknown ``workload_type`` reads as ``deployment`` (a newer istiod adding a value must not
  NACK every such resource);
- workload ``services`` keys and service keys must be ``namespace/hostname``;
- a service address with a prefix ``length`` shorter than the full host length is a CIDR VIP
  (``Service.cidr_vips``), never treated as a host VIP.

Where ztunnel silently drops a malformed authorization entry (a bad IP prefix, an empty string
match) we refuse the whole policy instead: dropping an entry from an ALLOW rule would widen it.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from typing import TypeVar

from ztunnel_py.errors import ConversionError
from ztunnel_py.ip import IPNetwork
from ztunnel_py.protos import authorization_pb2 as az_pb
from ztunnel_py.protos import workload_pb2 as wl_pb
from ztunnel_py.rbac.model import (
    Action,
    Authorization,
    Match,
    Scope,
    ServiceAccountMatch,
    StringMatch,
    StringMatchKind,
)
from ztunnel_py.state.model import (
    DEFAULT_CLUSTER_ID,
    DEFAULT_SERVICE_ACCOUNT,
    DEFAULT_TRUST_DOMAIN,
    DEFAULT_WORKLOAD_TYPE,
    ApplicationTunnel,
    AppTunnelProtocol,
    CidrVip,
    GatewayAddress,
    HealthStatus,
    InboundProtocol,
    IPAddress,
    IpFamily,
    LoadBalancer,
    LoadBalancerHealthPolicy,
    LoadBalancerMode,
    LoadBalancerScope,
    Locality,
    NamespacedHostname,
    NetworkAddress,
    NetworkMode,
    Service,
    Visibility,
    WeightedWaypoint,
    Workload,
    frozen_map,
)

__all__ = [
    "address_from_pb",
    "authorization_from_pb",
    "ip_from_bytes",
    "service_from_pb",
    "workload_from_pb",
]

_V = TypeVar("_V")
_MAX_PORT = 65535

_TUNNEL_PROTOCOLS: dict[int, InboundProtocol] = {
    wl_pb.TunnelProtocol.NONE: InboundProtocol.TCP,
    wl_pb.TunnelProtocol.HBONE: InboundProtocol.HBONE,
}
_NETWORK_MODES: dict[int, NetworkMode] = {
    wl_pb.NetworkMode.STANDARD: NetworkMode.STANDARD,
    wl_pb.NetworkMode.HOST_NETWORK: NetworkMode.HOST_NETWORK,
}
_STATUSES: dict[int, HealthStatus] = {
    wl_pb.WorkloadStatus.HEALTHY: HealthStatus.HEALTHY,
    wl_pb.WorkloadStatus.UNHEALTHY: HealthStatus.UNHEALTHY,
}
_WORKLOAD_TYPES: dict[int, str] = {
    wl_pb.WorkloadType.DEPLOYMENT: "deployment",
    wl_pb.WorkloadType.CRONJOB: "cronjob",
    wl_pb.WorkloadType.POD: "pod",
    wl_pb.WorkloadType.JOB: "job",
}
_APP_TUNNEL_PROTOCOLS: dict[int, AppTunnelProtocol] = {
    wl_pb.ApplicationTunnel.Protocol.NONE: AppTunnelProtocol.NONE,
    wl_pb.ApplicationTunnel.Protocol.PROXY: AppTunnelProtocol.PROXY,
}
_LB_SCOPES: dict[int, LoadBalancerScope] = {
    wl_pb.LoadBalancing.Scope.REGION: LoadBalancerScope.REGION,
    wl_pb.LoadBalancing.Scope.ZONE: LoadBalancerScope.ZONE,
    wl_pb.LoadBalancing.Scope.SUBZONE: LoadBalancerScope.SUBZONE,
    wl_pb.LoadBalancing.Scope.NODE: LoadBalancerScope.NODE,
    wl_pb.LoadBalancing.Scope.CLUSTER: LoadBalancerScope.CLUSTER,
    wl_pb.LoadBalancing.Scope.NETWORK: LoadBalancerScope.NETWORK,
}
_LB_MODES: dict[int, LoadBalancerMode] = {
    wl_pb.LoadBalancing.Mode.UNSPECIFIED_MODE: LoadBalancerMode.STANDARD,
    wl_pb.LoadBalancing.Mode.STRICT: LoadBalancerMode.STRICT,
    wl_pb.LoadBalancing.Mode.FAILOVER: LoadBalancerMode.FAILOVER,
    wl_pb.LoadBalancing.Mode.PASSTHROUGH: LoadBalancerMode.PASSTHROUGH,
}
_LB_HEALTH: dict[int, LoadBalancerHealthPolicy] = {
    wl_pb.LoadBalancing.HealthPolicy.ONLY_HEALTHY: LoadBalancerHealthPolicy.ONLY_HEALTHY,
    wl_pb.LoadBalancing.HealthPolicy.ALLOW_ALL: LoadBalancerHealthPolicy.ALLOW_ALL,
}
_IP_FAMILIES: dict[int, IpFamily | None] = {
    wl_pb.IPFamilies.AUTOMATIC: None,
    wl_pb.IPFamilies.IPV4_ONLY: IpFamily.IPV4,
    wl_pb.IPFamilies.IPV6_ONLY: IpFamily.IPV6,
    wl_pb.IPFamilies.DUAL: IpFamily.DUAL,
}
_VISIBILITIES: dict[int, Visibility] = {
    wl_pb.Service.Visibility.PUBLIC: Visibility.PUBLIC,
    wl_pb.Service.Visibility.NAMESPACE: Visibility.NAMESPACE,
}
_SCOPES: dict[int, Scope] = {
    az_pb.Scope.GLOBAL: Scope.GLOBAL,
    az_pb.Scope.NAMESPACE: Scope.NAMESPACE,
    az_pb.Scope.WORKLOAD_SELECTOR: Scope.WORKLOAD_SELECTOR,
}
_ACTIONS: dict[int, Action] = {az_pb.Action.ALLOW: Action.ALLOW, az_pb.Action.DENY: Action.DENY}


def _enum(name: str, what: str, table: Mapping[int, _V], value: int) -> _V:
    try:
        return table[value]
    except KeyError:
        raise ConversionError(name, f"unknown {what} value {value}") from None


def ip_from_bytes(name: str, raw: bytes, what: str = "address") -> IPAddress:
    """A raw 4- or 16-byte IP, as istiod encodes them."""
    if len(raw) == 4:
        return ipaddress.IPv4Address(raw)
    if len(raw) == 16:
        return ipaddress.IPv6Address(raw)
    raise ConversionError(name, f"{what} is {len(raw)} bytes, but an IP address is 4 or 16 bytes")


def _port(name: str, what: str, value: int) -> int:
    if value > _MAX_PORT:
        raise ConversionError(name, f"{what} {value} is not a port (0..65535)")
    return value


def _namespaced_hostname(name: str, what: str, text: str) -> NamespacedHostname:
    try:
        return NamespacedHostname.parse(text)
    except ValueError:
        raise ConversionError(name, f"{what} {text!r} is not namespace/hostname") from None


def _gateway(name: str, what: str, gw: wl_pb.GatewayAddress) -> GatewayAddress:
    kind = gw.WhichOneof("destination")
    destination: NetworkAddress | NamespacedHostname
    if kind == "address":
        ip = ip_from_bytes(name, gw.address.address, f"{what} address")
        destination = NetworkAddress(gw.address.network, ip)
    elif kind == "hostname":
        if not gw.hostname.namespace or not gw.hostname.hostname:
            raise ConversionError(name, f"{what} hostname needs both namespace and hostname")
        destination = NamespacedHostname(gw.hostname.namespace, gw.hostname.hostname)
    else:
        raise ConversionError(name, f"{what} has neither an address nor a hostname")
    return GatewayAddress(
        destination=destination,
        hbone_mtls_port=_port(name, f"{what} hbone_mtls_port", gw.hbone_mtls_port),
    )


def _port_map(name: str, what: str, ports: Iterable[wl_pb.Port]) -> Mapping[int, int]:
    out: dict[int, int] = {}
    for p in ports:
        out[_port(name, f"{what} service_port", p.service_port)] = _port(
            name, f"{what} target_port", p.target_port
        )
    return frozen_map(out)


def workload_from_pb(name: str, w: wl_pb.Workload) -> Workload:
    if not w.uid:
        raise ConversionError(name, "workload has no uid")
    if w.tunnel_protocol == wl_pb.TunnelProtocol.LEGACY_ISTIO_MTLS:
        raise ConversionError(name, "unsupported tunnel protocol: legacy istio mtls")
    services: dict[str, Mapping[int, int]] = {}
    for key, port_list in w.services.items():
        _namespaced_hostname(name, "services key", key)
        services[key] = _port_map(name, f"services[{key}]", port_list.ports)
    app_tunnel = None
    if w.HasField("application_tunnel"):
        at = w.application_tunnel
        app_tunnel = ApplicationTunnel(
            protocol=_enum(name, "application_tunnel.protocol", _APP_TUNNEL_PROTOCOLS, at.protocol),
            port=_port(name, "application_tunnel.port", at.port) or None,
        )
    locality = Locality()
    if w.HasField("locality"):
        loc = w.locality
        locality = Locality(region=loc.region, zone=loc.zone, subzone=loc.subzone)
    return Workload(
        uid=w.uid,
        name=w.name,
        namespace=w.namespace,
        workload_ips=tuple(
            ip_from_bytes(name, a, f"addresses[{i}]") for i, a in enumerate(w.addresses)
        ),
        hostname=w.hostname,
        network=w.network,
        protocol=_enum(name, "tunnel_protocol", _TUNNEL_PROTOCOLS, w.tunnel_protocol),
        trust_domain=w.trust_domain or DEFAULT_TRUST_DOMAIN,
        service_account=w.service_account or DEFAULT_SERVICE_ACCOUNT,
        waypoint=_gateway(name, "waypoint", w.waypoint) if w.HasField("waypoint") else None,
        network_gateway=_gateway(name, "network_gateway", w.network_gateway)
        if w.HasField("network_gateway")
        else None,
        node=w.node,
        canonical_name=w.canonical_name,
        canonical_revision=w.canonical_revision,
        workload_type=_WORKLOAD_TYPES.get(w.workload_type, DEFAULT_WORKLOAD_TYPE),
        workload_name=w.workload_name,
        native_tunnel=w.native_tunnel,
        application_tunnel=app_tunnel,
        services=frozen_map(services),
        authorization_policies=tuple(w.authorization_policies),
        status=_enum(name, "status", _STATUSES, w.status),
        cluster_id=w.cluster_id or DEFAULT_CLUSTER_ID,
        locality=locality,
        network_mode=_enum(name, "network_mode", _NETWORK_MODES, w.network_mode),
        capacity=w.capacity.value if w.HasField("capacity") else 1,
    )


def service_from_pb(name: str, s: wl_pb.Service) -> Service:
    if not s.namespace or not s.hostname or "/" in s.namespace:
        key = f"{s.namespace}/{s.hostname}"
        raise ConversionError(name, f"service key {key!r} is not namespace/hostname")
    vips: list[NetworkAddress] = []
    cidrs: list[CidrVip] = []
    for i, addr in enumerate(s.addresses):
        ip = ip_from_bytes(name, addr.address, f"addresses[{i}]")
        if addr.HasField("length") and addr.length != ip.max_prefixlen:
            if addr.length > ip.max_prefixlen:
                raise ConversionError(
                    name, f"addresses[{i}] prefix length {addr.length} is too long for {ip}"
                )
            prefix = ipaddress.ip_network((ip, addr.length), strict=False)
            cidrs.append(CidrVip(addr.network, prefix))
        else:
            vips.append(NetworkAddress(addr.network, ip))
    weighted: list[WeightedWaypoint] = []
    for i, ww in enumerate(s.weighted_waypoints):
        if not ww.HasField("destination"):
            raise ConversionError(name, f"weighted_waypoints[{i}] has no destination")
        gateway = _gateway(name, f"weighted_waypoints[{i}]", ww.destination)
        weighted.append(WeightedWaypoint(gateway, ww.weight))
    load_balancer = None
    if s.HasField("load_balancing"):
        lb = s.load_balancing
        load_balancer = LoadBalancer(
            routing_preferences=tuple(
                _enum(name, "load_balancing.routing_preference", _LB_SCOPES, scope)
                for scope in lb.routing_preference
            ),
            mode=_enum(name, "load_balancing.mode", _LB_MODES, lb.mode),
            health_policy=_enum(name, "load_balancing.health_policy", _LB_HEALTH, lb.health_policy),
        )
    return Service(
        name=s.name,
        namespace=s.namespace,
        hostname=s.hostname,
        vips=tuple(vips),
        ports=_port_map(name, "ports", s.ports),
        subject_alt_names=tuple(s.subject_alt_names),
        waypoint=_gateway(name, "waypoint", s.waypoint) if s.HasField("waypoint") else None,
        weighted_waypoints=tuple(weighted),
        load_balancer=load_balancer,
        ip_families=_enum(name, "ip_families", _IP_FAMILIES, s.ip_families),
        canonical=s.canonical,
        visibility=_VISIBILITIES.get(s.visibility, Visibility.PUBLIC),
        cidr_vips=tuple(cidrs),
    )


def address_from_pb(name: str, address: wl_pb.Address) -> Workload | Service:
    kind = address.WhichOneof("type")
    if kind == "workload":
        return workload_from_pb(name, address.workload)
    if kind == "service":
        return service_from_pb(name, address.service)
    raise ConversionError(name, "unknown address type (neither workload nor service)")


# --- authorization --------------------------------------------------------------------------


def _string_match(name: str, what: str, m: az_pb.StringMatch) -> StringMatch:
    kind = m.WhichOneof("match_type")
    if kind == "exact":
        return StringMatch(StringMatchKind.EXACT, m.exact)
    if kind == "prefix":
        return StringMatch(StringMatchKind.PREFIX, m.prefix)
    if kind == "suffix":
        return StringMatch(StringMatchKind.SUFFIX, m.suffix)
    if kind == "presence":
        return StringMatch(StringMatchKind.PRESENCE)
    raise ConversionError(name, f"{what} has no match type (exact, prefix, suffix or presence)")


def _prefix(name: str, what: str, a: az_pb.Address) -> IPNetwork:
    ip = ip_from_bytes(name, a.address, what)
    if a.length > ip.max_prefixlen:
        raise ConversionError(name, f"{what} prefix length {a.length} is too long for {ip}")
    return ipaddress.ip_network((ip, a.length), strict=False)


def _match(name: str, where: str, m: az_pb.Match) -> Match:
    def strings(field: str, items: Iterable[az_pb.StringMatch]) -> tuple[StringMatch, ...]:
        return tuple(_string_match(name, f"{where}.{field}", s) for s in items)

    def prefixes(field: str, items: Iterable[az_pb.Address]) -> tuple[IPNetwork, ...]:
        return tuple(_prefix(name, f"{where}.{field}", a) for a in items)

    def ports(field: str, items: Iterable[int]) -> tuple[int, ...]:
        return tuple(_port(name, f"{where}.{field}", p) for p in items)

    return Match(
        namespaces=strings("namespaces", m.namespaces),
        not_namespaces=strings("not_namespaces", m.not_namespaces),
        service_accounts=tuple(
            ServiceAccountMatch(sa.namespace, sa.serviceAccount) for sa in m.service_accounts
        ),
        not_service_accounts=tuple(
            ServiceAccountMatch(sa.namespace, sa.serviceAccount) for sa in m.not_service_accounts
        ),
        principals=strings("principals", m.principals),
        not_principals=strings("not_principals", m.not_principals),
        source_ips=prefixes("source_ips", m.source_ips),
        not_source_ips=prefixes("not_source_ips", m.not_source_ips),
        destination_ips=prefixes("destination_ips", m.destination_ips),
        not_destination_ips=prefixes("not_destination_ips", m.not_destination_ips),
        destination_ports=ports("destination_ports", m.destination_ports),
        not_destination_ports=ports("not_destination_ports", m.not_destination_ports),
    )


def authorization_from_pb(name: str, a: az_pb.Authorization) -> Authorization:
    if not a.name or not a.namespace:
        raise ConversionError(name, "authorization needs both name and namespace")
    rules = tuple(
        tuple(
            tuple(
                _match(name, f"rules[{r}].clauses[{c}].matches[{i}]", m)
                for i, m in enumerate(clause.matches)
            )
            for c, clause in enumerate(rule.clauses)
        )
        for r, rule in enumerate(a.rules)
    )
    return Authorization(
        name=a.name,
        namespace=a.namespace,
        scope=_enum(name, "scope", _SCOPES, a.scope),
        action=_enum(name, "action", _ACTIONS, a.action),
        rules=rules,
        dry_run=a.dry_run,
    )
