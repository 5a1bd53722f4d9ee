"""istiod protobuf resources into model types, with ztunnel's defaults and refusals."""

from __future__ import annotations

import ipaddress

import pytest
from google.protobuf import empty_pb2

from ztunnel_py.admin.dump import service_to_dict
from ztunnel_py.errors import ConversionError
from ztunnel_py.protos import authorization_pb2 as az
from ztunnel_py.protos import workload_pb2 as wl
from ztunnel_py.rbac.model import (
    Action,
    Scope,
    ServiceAccountMatch,
    StringMatch,
    StringMatchKind,
)
from ztunnel_py.state.convert import (
    address_from_pb,
    authorization_from_pb,
    service_from_pb,
    workload_from_pb,
)
from ztunnel_py.state.model import (
    AppTunnelProtocol,
    CidrVip,
    GatewayAddress,
    HealthStatus,
    InboundProtocol,
    IpFamily,
    LoadBalancerHealthPolicy,
    LoadBalancerMode,
    LoadBalancerScope,
    NamespacedHostname,
    NetworkAddress,
    NetworkMode,
    Service,
    Visibility,
    WeightedWaypoint,
    Workload,
)
from ztunnel_py.state.store import ProxyState
from ztunnel_py.testing.istiod import service_to_pb

IP4 = bytes([10, 0, 0, 7])
IP6 = ipaddress.IPv6Address("fd00::7").packed
UID = "Kubernetes//Pod/ns1/pod-a"


def pb_workload(**kw: object) -> wl.Workload:
    fields: dict[str, object] = {"uid": UID, "name": "pod-a", "namespace": "ns1"}
    fields.update(kw)
    return wl.Workload(**fields)  # type: ignore[arg-type]


def pb_service(**kw: object) -> wl.Service:
    fields: dict[str, object] = {
        "name": "svc",
        "namespace": "ns1",
        "hostname": "svc.ns1.svc.cluster.local",
    }
    fields.update(kw)
    return wl.Service(**fields)  # type: ignore[arg-type]


def rejected(call: object, *args: object) -> ConversionError:
    with pytest.raises(ConversionError) as info:
        call(*args)  # type: ignore[operator]
    return info.value


# --- workloads ---------------------------------------------------------------------------------


def test_workload_defaults_are_ztunnels() -> None:
    w = workload_from_pb(UID, pb_workload())
    assert w.trust_domain == "cluster.local"
    assert w.service_account == "default"
    assert w.cluster_id == "Kubernetes"
    assert w.capacity == 1
    assert w.protocol is InboundProtocol.TCP
    assert w.workload_type == "deployment"
    assert w.status is HealthStatus.HEALTHY
    assert w.waypoint is None
    assert w.application_tunnel is None


def test_workload_fields_carry_over() -> None:
    pb = pb_workload(
        addresses=[IP4, IP6],
        network="net1",
        tunnel_protocol=wl.HBONE,
        trust_domain="example.org",
        service_account="sa1",
        node="node-1",
        cluster_id="c2",
        workload_type=wl.POD,
        status=wl.UNHEALTHY,
        network_mode=wl.HOST_NETWORK,
        authorization_policies=["ns1/allow-a"],
        native_tunnel=True,
        locality=wl.Locality(region="r", zone="z", subzone="s"),
        application_tunnel=wl.ApplicationTunnel(protocol=wl.ApplicationTunnel.PROXY, port=15088),
        services={
            "ns1/svc.ns1.svc.cluster.local": wl.PortList(
                ports=[wl.Port(service_port=80, target_port=8080)]
            )
        },
    )
    pb.capacity.value = 5
    w = workload_from_pb(UID, pb)
    assert w.workload_ips == (ipaddress.ip_address("10.0.0.7"), ipaddress.ip_address("fd00::7"))
    assert w.network_addresses[0] == NetworkAddress("net1", ipaddress.ip_address("10.0.0.7"))
    assert w.protocol is InboundProtocol.HBONE
    assert w.identity == "spiffe://example.org/ns/ns1/sa/sa1"
    assert (w.node, w.cluster_id, w.workload_type) == ("node-1", "c2", "pod")
    assert w.status is HealthStatus.UNHEALTHY
    assert w.network_mode is NetworkMode.HOST_NETWORK
    assert w.authorization_policies == ("ns1/allow-a",)
    assert w.native_tunnel
    assert (w.locality.region, w.locality.zone, w.locality.subzone) == ("r", "z", "s")
    assert w.application_tunnel is not None
    assert w.application_tunnel.protocol is AppTunnelProtocol.PROXY
    assert w.application_tunnel.port == 15088
    assert dict(w.services["ns1/svc.ns1.svc.cluster.local"]) == {80: 8080}
    assert w.capacity == 5


def test_explicit_zero_capacity_is_kept() -> None:
    pb = pb_workload()
    pb.capacity.value = 0
    assert workload_from_pb(UID, pb).capacity == 0


def test_application_tunnel_port_zero_means_unset() -> None:
    pb = pb_workload(application_tunnel=wl.ApplicationTunnel(protocol=wl.ApplicationTunnel.NONE))
    tunnel = workload_from_pb(UID, pb).application_tunnel
    assert tunnel is not None
    assert tunnel.port is None


@pytest.mark.parametrize("raw", [b"", b"\x01\x02\x03", bytes(5), bytes(15)])
def test_ip_of_wrong_length_is_refused(raw: bytes) -> None:
    err = rejected(workload_from_pb, UID, pb_workload(addresses=[raw]))
    assert err.resource_name == UID
    assert f"{len(raw)} bytes" in err.reason


def test_legacy_istio_mtls_is_refused() -> None:
    err = rejected(workload_from_pb, UID, pb_workload(tunnel_protocol=wl.LEGACY_ISTIO_MTLS))
    assert "legacy istio mtls" in err.reason
    assert str(err).startswith(f"{UID}: ")


@pytest.mark.parametrize(
    ("field", "value"),
    [("tunnel_protocol", 9), ("status", 7), ("network_mode", 4)],
)
def test_unknown_enum_values_are_refused(field: str, value: int) -> None:
    err = rejected(workload_from_pb, UID, pb_workload(**{field: value}))
    assert field in err.reason
    assert str(value) in err.reason


def test_unknown_application_tunnel_protocol_is_refused() -> None:
    pb = pb_workload(application_tunnel=wl.ApplicationTunnel(protocol=3))  # type: ignore[arg-type]
    assert "application_tunnel.protocol" in rejected(workload_from_pb, UID, pb).reason


def test_unknown_workload_type_reads_as_deployment_like_ztunnel() -> None:
    assert workload_from_pb(UID, pb_workload(workload_type=42)).workload_type == "deployment"


@pytest.mark.parametrize("key", ["no-slash", "/host", "ns/", ""])
def test_bad_services_key_is_refused(key: str) -> None:
    pb = pb_workload(services={key: wl.PortList(ports=[wl.Port(service_port=80, target_port=80)])})
    err = rejected(workload_from_pb, UID, pb)
    assert "namespace/hostname" in err.reason
    assert repr(key) in err.reason


def test_out_of_range_port_is_refused() -> None:
    pb = pb_workload(
        services={"ns1/h": wl.PortList(ports=[wl.Port(service_port=80, target_port=70000)])}
    )
    assert "70000" in rejected(workload_from_pb, UID, pb).reason


def test_workload_without_uid_is_refused() -> None:
    assert "uid" in rejected(workload_from_pb, "x", pb_workload(uid="")).reason


def test_gateway_address_and_hostname_forms() -> None:
    pb = pb_workload(
        waypoint=wl.GatewayAddress(
            address=wl.NetworkAddress(network="n", address=IP4), hbone_mtls_port=15008
        ),
        network_gateway=wl.GatewayAddress(
            hostname=wl.NamespacedHostname(namespace="istio-system", hostname="eastwest.example"),
            hbone_mtls_port=15009,
        ),
    )
    w = workload_from_pb(UID, pb)
    assert w.waypoint is not None
    assert w.waypoint.destination == NetworkAddress("n", ipaddress.ip_address("10.0.0.7"))
    assert w.network_gateway is not None
    assert w.network_gateway.destination == NamespacedHostname("istio-system", "eastwest.example")
    assert w.network_gateway.hbone_mtls_port == 15009


def test_gateway_without_destination_is_refused() -> None:
    pb = pb_workload(waypoint=wl.GatewayAddress(hbone_mtls_port=15008))
    assert "waypoint" in rejected(workload_from_pb, UID, pb).reason


# --- services ----------------------------------------------------------------------------------


def test_service_conversion() -> None:
    pb = pb_service(
        addresses=[wl.NetworkAddress(network="", address=bytes([10, 96, 0, 1]))],
        ports=[wl.Port(service_port=80, target_port=8080), wl.Port(service_port=443)],
        subject_alt_names=["spiffe://cluster.local/ns/ns1/sa/sa1"],
        load_balancing=wl.LoadBalancing(
            routing_preference=[wl.LoadBalancing.NETWORK, wl.LoadBalancing.ZONE],
            mode=wl.LoadBalancing.FAILOVER,
            health_policy=wl.LoadBalancing.ALLOW_ALL,
        ),
        ip_families=wl.DUAL,
        canonical=True,
        visibility=wl.Service.NAMESPACE,
    )
    converted = service_from_pb("ns1/svc.ns1.svc.cluster.local", pb)
    svc = converted
    assert svc.key == "ns1/svc.ns1.svc.cluster.local"
    assert svc.vips == (NetworkAddress("", ipaddress.ip_address("10.96.0.1")),)
    assert dict(svc.ports) == {80: 8080, 443: 0}
    assert svc.load_balancer is not None
    assert svc.load_balancer.routing_preferences == (
        LoadBalancerScope.NETWORK,
        LoadBalancerScope.ZONE,
    )
    assert svc.load_balancer.mode is LoadBalancerMode.FAILOVER
    assert svc.load_balancer.health_policy is LoadBalancerHealthPolicy.ALLOW_ALL
    assert svc.ip_families is IpFamily.DUAL
    assert svc.canonical
    assert svc.visibility is Visibility.NAMESPACE
    assert converted.cidr_vips == ()


def test_service_defaults() -> None:
    svc = service_from_pb("k", pb_service())
    assert svc.load_balancer is None
    assert svc.ip_families is None  # AUTOMATIC
    assert svc.visibility is Visibility.PUBLIC
    assert svc.vips == ()


def test_unspecified_lb_mode_is_standard() -> None:
    svc = service_from_pb("k", pb_service(load_balancing=wl.LoadBalancing()))
    assert svc.load_balancer is not None
    assert svc.load_balancer.mode is LoadBalancerMode.STANDARD


def test_host_length_is_a_plain_vip_and_shorter_is_a_cidr_vip() -> None:
    pb = pb_service(
        addresses=[
            wl.NetworkAddress(network="n", address=bytes([10, 96, 0, 1]), length=32),
            wl.NetworkAddress(network="n", address=bytes([10, 200, 1, 9]), length=24),
            wl.NetworkAddress(network="", address=IP6, length=64),
        ]
    )
    converted = service_from_pb("k", pb)
    assert converted.vips == (NetworkAddress("n", ipaddress.ip_address("10.96.0.1")),)
    assert converted.cidr_vips == (
        CidrVip("n", ipaddress.ip_network("10.200.1.0/24")),
        CidrVip("", ipaddress.ip_network("fd00::/64")),
    )
    assert str(converted.cidr_vips[0]) == "n/10.200.1.0/24"


def test_zero_length_is_a_cidr_not_a_host() -> None:
    # `optional` matters: length 0 present is "everything", absent is "this host".
    pb = pb_service(addresses=[wl.NetworkAddress(address=IP4, length=0)])
    assert service_from_pb("k", pb).cidr_vips == (CidrVip("", ipaddress.ip_network("0.0.0.0/0")),)


def test_too_long_prefix_is_refused() -> None:
    pb = pb_service(addresses=[wl.NetworkAddress(address=IP4, length=33)])
    assert "33" in rejected(service_from_pb, "k", pb).reason


@pytest.mark.parametrize(
    ("namespace", "hostname"), [("", "h.example"), ("ns1", ""), ("a/b", "h.example")]
)
def test_bad_service_key_is_refused(namespace: str, hostname: str) -> None:
    err = rejected(service_from_pb, "k", pb_service(namespace=namespace, hostname=hostname))
    assert "namespace/hostname" in err.reason


def test_unspecified_routing_scope_is_refused() -> None:
    pb = pb_service(
        load_balancing=wl.LoadBalancing(routing_preference=[wl.LoadBalancing.UNSPECIFIED_SCOPE])
    )
    assert "routing_preference" in rejected(service_from_pb, "k", pb).reason


@pytest.mark.parametrize(
    "lb",
    [wl.LoadBalancing(mode=9), wl.LoadBalancing(health_policy=5)],  # type: ignore[arg-type]
)
def test_unknown_lb_enums_are_refused(lb: wl.LoadBalancing) -> None:
    assert "unknown" in rejected(service_from_pb, "k", pb_service(load_balancing=lb)).reason


def test_unknown_ip_families_is_refused() -> None:
    assert "ip_families" in rejected(service_from_pb, "k", pb_service(ip_families=8)).reason


def test_unknown_visibility_fails_open_like_ztunnel() -> None:
    assert service_from_pb("k", pb_service(visibility=5)).visibility is Visibility.PUBLIC


def test_weighted_waypoint_without_destination_is_refused() -> None:
    pb = pb_service(weighted_waypoints=[wl.WeightedWaypoint(weight=10)])
    assert "weighted_waypoints[0]" in rejected(service_from_pb, "k", pb).reason


def test_weighted_waypoints_are_kept_in_order_with_their_weights() -> None:
    primary = wl.GatewayAddress(
        address=wl.NetworkAddress(address=bytes([10, 0, 0, 1])), hbone_mtls_port=15008
    )
    canary = wl.GatewayAddress(
        hostname=wl.NamespacedHostname(namespace="ns1", hostname="canary.ns1.svc.cluster.local"),
        hbone_mtls_port=15008,
    )
    pb = pb_service(
        waypoint=primary,
        weighted_waypoints=[
            wl.WeightedWaypoint(destination=primary, weight=90),
            wl.WeightedWaypoint(destination=canary, weight=10),
        ],
    )
    svc = service_from_pb("k", pb)
    assert [(str(w.destination.destination), w.weight) for w in svc.weighted_waypoints] == [
        ("/10.0.0.1", 90),
        ("ns1/canary.ns1.svc.cluster.local", 10),
    ]
    assert svc.waypoint == svc.weighted_waypoints[0].destination


def test_weighted_waypoint_with_a_bad_address_is_refused() -> None:
    bad = wl.GatewayAddress(address=wl.NetworkAddress(address=b"\x01\x02"))
    pb = pb_service(weighted_waypoints=[wl.WeightedWaypoint(destination=bad, weight=1)])
    assert "weighted_waypoints[0]" in rejected(service_from_pb, "k", pb).reason


def test_address_dispatch() -> None:
    assert isinstance(address_from_pb(UID, wl.Address(workload=pb_workload())), Workload)
    assert isinstance(address_from_pb("k", wl.Address(service=pb_service())), Service)
    assert "unknown address type" in rejected(address_from_pb, "empty", wl.Address()).reason


# --- authorization ------------------------------------------------------------------------------


def pb_policy(**kw: object) -> az.Authorization:
    fields: dict[str, object] = {"name": "allow-a", "namespace": "ns1"}
    fields.update(kw)
    return az.Authorization(**fields)  # type: ignore[arg-type]


def test_authorization_conversion() -> None:
    match = az.Match(
        namespaces=[az.StringMatch(exact="ns2")],
        not_namespaces=[az.StringMatch(prefix="kube-")],
        principals=[az.StringMatch(suffix="/sa/admin")],
        not_principals=[az.StringMatch(presence=empty_pb2.Empty())],
        service_accounts=[az.ServiceAccountMatch(namespace="ns3", serviceAccount="sa3")],
        not_service_accounts=[az.ServiceAccountMatch(namespace="ns4", serviceAccount="sa4")],
        source_ips=[az.Address(address=bytes([10, 1, 2, 3]), length=16)],
        not_source_ips=[az.Address(address=IP6, length=128)],
        destination_ips=[az.Address(address=IP4, length=32)],
        destination_ports=[80, 443],
        not_destination_ports=[9999],
    )
    pb = pb_policy(
        scope=az.WORKLOAD_SELECTOR,
        action=az.DENY,
        dry_run=True,
        rules=[az.Rule(clauses=[az.Clause(matches=[match, az.Match()])])],
    )
    policy = authorization_from_pb("ns1/allow-a", pb)
    assert policy.key == "ns1/allow-a"
    assert policy.scope is Scope.WORKLOAD_SELECTOR
    assert policy.action is Action.DENY
    assert policy.dry_run
    ((clause,),) = policy.rules
    m, empty = clause
    assert empty.is_empty
    assert m.namespaces == (StringMatch(StringMatchKind.EXACT, "ns2"),)
    assert m.not_namespaces == (StringMatch(StringMatchKind.PREFIX, "kube-"),)
    assert m.principals == (StringMatch(StringMatchKind.SUFFIX, "/sa/admin"),)
    assert m.not_principals == (StringMatch(StringMatchKind.PRESENCE),)
    assert m.service_accounts == (ServiceAccountMatch("ns3", "sa3"),)
    assert m.not_service_accounts == (ServiceAccountMatch("ns4", "sa4"),)
    assert m.source_ips == (ipaddress.ip_network("10.1.0.0/16"),)
    assert m.not_source_ips == (ipaddress.ip_network("fd00::7/128"),)
    assert m.destination_ips == (ipaddress.ip_network("10.0.0.7/32"),)
    assert m.destination_ports == (80, 443)
    assert m.not_destination_ports == (9999,)


def test_authorization_defaults() -> None:
    policy = authorization_from_pb("ns1/allow-a", pb_policy())
    assert policy.scope is Scope.GLOBAL  # wire zero value
    assert policy.action is Action.ALLOW
    assert policy.rules == ()


@pytest.mark.parametrize(("field", "value"), [("scope", 3), ("action", 2)])
def test_unknown_policy_enums_are_refused(field: str, value: int) -> None:
    err = rejected(authorization_from_pb, "ns1/allow-a", pb_policy(**{field: value}))
    assert field in err.reason


def _with_match(match: az.Match) -> az.Authorization:
    return pb_policy(rules=[az.Rule(clauses=[az.Clause(matches=[match])])])


def test_bad_ip_in_policy_is_refused_rather_than_dropped() -> None:
    pb = _with_match(az.Match(source_ips=[az.Address(address=b"\x01\x02", length=8)]))
    err = rejected(authorization_from_pb, "ns1/allow-a", pb)
    assert "rules[0].clauses[0].matches[0].source_ips" in err.reason


def test_too_long_prefix_in_policy_is_refused() -> None:
    pb = _with_match(az.Match(destination_ips=[az.Address(address=IP4, length=40)]))
    assert "40" in rejected(authorization_from_pb, "ns1/allow-a", pb).reason


def test_empty_string_match_is_refused_rather_than_dropped() -> None:
    pb = _with_match(az.Match(principals=[az.StringMatch()]))
    assert "principals" in rejected(authorization_from_pb, "ns1/allow-a", pb).reason


def test_policy_port_out_of_range_is_refused() -> None:
    pb = _with_match(az.Match(destination_ports=[65536]))
    assert "65536" in rejected(authorization_from_pb, "ns1/allow-a", pb).reason


def test_policy_without_name_is_refused() -> None:
    assert "name" in rejected(authorization_from_pb, "ns1/", pb_policy(name="")).reason


def test_weighted_waypoints_round_trip_and_dump() -> None:
    gw = GatewayAddress(destination=NamespacedHostname("ns1", "wp.ns1.svc.cluster.local"))
    svc = Service(
        name="svc",
        namespace="ns1",
        hostname="svc.ns1.svc.cluster.local",
        waypoint=gw,
        weighted_waypoints=(WeightedWaypoint(gw, 3),),
    )
    assert service_from_pb("k", service_to_pb(svc)) == svc
    assert service_to_dict(svc, ProxyState())["weightedWaypoints"] == [
        {
            "destination": {"destination": "ns1/wp.ns1.svc.cluster.local", "hboneMtlsPort": 15008},
            "weight": 3,
        }
    ]


# --- IPv6 address bytes ------------------------------------------------------------------------

MAPPED = ipaddress.IPv6Address("::ffff:10.0.0.7")


def test_ipv4_mapped_bytes_stay_ipv6_as_in_ztunnel() -> None:
    """ztunnel's byte_to_ip: 16 bytes are an IPv6 address, also ``::ffff:a.b.c.d``."""
    w = workload_from_pb(UID, pb_workload(addresses=[IP4, MAPPED.packed]))
    assert w.workload_ips == (ipaddress.IPv4Address("10.0.0.7"), MAPPED)
    s = service_from_pb(
        "ns1/svc",
        pb_service(
            addresses=[
                wl.NetworkAddress(address=MAPPED.packed),
                wl.NetworkAddress(address=MAPPED.packed, length=120),
            ]
        ),
    )
    assert s.vips == (NetworkAddress("", MAPPED),)
    assert s.cidr_vips == (CidrVip("", ipaddress.IPv6Network("::ffff:10.0.0.0/120")),)
    pb = _with_match(az.Match(source_ips=[az.Address(address=MAPPED.packed, length=104)]))
    (rule,) = authorization_from_pb("ns1/allow-a", pb).rules
    assert rule[0][0].source_ips == (ipaddress.IPv6Network("::ffff:10.0.0.0/104"),)


def test_wrong_length_workload_address_names_its_index() -> None:
    err = rejected(workload_from_pb, UID, pb_workload(addresses=[IP6, bytes(6)]))
    assert err.reason == "addresses[1] is 6 bytes, but an IP address is 4 or 16 bytes"
