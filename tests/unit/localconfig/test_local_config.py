"""ztunnel's local-config YAML: every example loads; every broken file names its bad field."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest
import yaml

from ztunnel_py.admin.dump import policy_to_dict, service_to_dict, state_dump, workload_to_dict
from ztunnel_py.errors import LocalConfigError
from ztunnel_py.rbac.model import Action, Scope, StringMatch, StringMatchKind
from ztunnel_py.state.model import (
    GatewayAddress,
    HealthStatus,
    InboundProtocol,
    LoadBalancerMode,
    LoadBalancerScope,
    NamespacedHostname,
    NetworkAddress,
)
from ztunnel_py.state.store import ProxyState
from ztunnel_py.xds.local import load_local_config_file, parse_local_config

ROOT = Path(__file__).resolve().parents[3]
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))
BAD = sorted((ROOT / "tests/data/local-config/bad").glob("*.yaml"))


def test_there_are_examples_and_a_broken_corpus() -> None:
    assert {p.name for p in EXAMPLES} >= {"localhost.yaml", "bookinfo.yaml"}
    assert len(BAD) >= 20


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_every_example_loads(path: Path) -> None:
    batch = load_local_config_file(path)
    state = ProxyState()
    state.apply(batch)
    assert list(state.workloads())
    assert list(state.services())


def test_localhost_example_has_ztunnels_content() -> None:
    state = ProxyState()
    state.apply(load_local_config_file(ROOT / "examples/localhost.yaml"))
    local = state.workload("cluster1//v1/Pod/default/local")
    assert local is not None and local.protocol is InboundProtocol.HBONE
    assert local.workload_ips == (ipaddress.ip_address("127.0.0.1"),)
    tcp = state.workload("cluster1//v1/Pod/default/local-tcp")
    assert tcp is not None and tcp.protocol is InboundProtocol.TCP
    example = state.service_by_vip(NetworkAddress("", ipaddress.ip_address("127.10.0.1")))
    assert example is not None and example.hostname == "example.com"
    assert example.subject_alt_names == ("spiffe://cluster.local/ns/default/sa/local",)
    remote = state.service("default/example2.com")
    assert remote is not None and remote.vips == (
        NetworkAddress("remote", ipaddress.ip_address("127.10.0.2")),
    )
    assert set(state.endpoints("default/example.com")) == {local.uid, tcp.uid}
    (policy,) = state.policies()
    assert policy.key == "default/deny-9999" and policy.action is Action.ALLOW
    assert policy.rules[0][0][0].not_destination_ports == (9999,)


def test_bookinfo_example_exercises_every_section() -> None:
    state = ProxyState()
    state.apply(load_local_config_file(ROOT / "examples/bookinfo.yaml"))
    ratings = state.workload("Kubernetes//Pod/backend/ratings-v1-1")
    assert ratings is not None and ratings.status is HealthStatus.UNHEALTHY
    assert ratings.waypoint == GatewayAddress(
        destination=NetworkAddress("", ipaddress.ip_address("10.40.3.2")), hbone_mtls_port=15008
    )
    reviews = state.service("backend/reviews.backend.svc.cluster.local")
    assert reviews is not None and reviews.load_balancer is not None
    assert reviews.load_balancer.mode is LoadBalancerMode.FAILOVER
    assert reviews.load_balancer.routing_preferences == (
        LoadBalancerScope.REGION,
        LoadBalancerScope.ZONE,
    )
    v2 = state.workload("Kubernetes//Pod/backend/reviews-v2-1")
    assert v2 is not None and v2.capacity == 2
    assert {p.key for p in state.policies_for(v2)} == {
        "istio-system/deny-ssh",
        "backend/allow-mesh-callers",
        "backend/reviews-from-frontend",
    }
    glob = state.policy("istio-system/deny-ssh")
    assert glob is not None and glob.scope is Scope.GLOBAL and glob.action is Action.DENY
    allow = state.policy("backend/allow-mesh-callers")
    assert allow is not None
    assert allow.rules[0][0][0].namespaces == (
        StringMatch(StringMatchKind.EXACT, "frontend"),
        StringMatch(StringMatchKind.EXACT, "backend"),
    )


def _expectation(path: Path) -> str:
    first = path.read_text().splitlines()[0]
    assert first.startswith("# expect: "), f"{path.name} must start with '# expect: <error>'"
    return first.removeprefix("# expect: ")


@pytest.mark.parametrize("path", BAD, ids=lambda p: p.name)
def test_broken_files_are_refused_with_the_field_path(path: Path) -> None:
    expected = _expectation(path)
    with pytest.raises(LocalConfigError) as info:
        load_local_config_file(path)
    assert f"{info.value.path}: {info.value.reason}" == expected
    assert str(path) in str(info.value)


def test_string_match_spellings() -> None:
    doc = """
policies:
  - name: p
    namespace: default
    rules:
      - - - principals: [{Exact: a}, {Prefix: b}, {Suffix: c}, {Presence: []}, plain]
"""
    (policy,) = parse_local_config(doc).policies
    kinds = [(m.kind, m.value) for m in policy.rules[0][0][0].principals]
    assert kinds == [
        (StringMatchKind.EXACT, "a"),
        (StringMatchKind.PREFIX, "b"),
        (StringMatchKind.SUFFIX, "c"),
        (StringMatchKind.PRESENCE, ""),
        (StringMatchKind.EXACT, "plain"),
    ]


def test_waypoint_hostname_destination() -> None:
    doc = """
workloads:
  - uid: u1
    name: a
    namespace: default
    waypoint: {destination: "default/waypoint.default.svc.cluster.local"}
"""
    (w,) = parse_local_config(doc).workloads
    assert w.waypoint is not None
    assert w.waypoint.destination == NamespacedHostname(
        "default", "waypoint.default.svc.cluster.local"
    )
    assert w.waypoint.hbone_mtls_port == 15008


def test_missing_uid_is_derived_from_name() -> None:
    (w,) = parse_local_config("workloads: [{name: a, namespace: ns}]", cluster_id="east").workloads
    assert w.uid == "east//v1/Pod/ns/a"


def test_empty_document_is_an_empty_mesh() -> None:
    batch = parse_local_config("")
    assert batch.replace and not (batch.workloads or batch.services or batch.policies)


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_dump_shapes_load_back_as_local_config(path: Path) -> None:
    """What /config_dump prints for a workload, service or policy is valid local config."""
    state = ProxyState()
    state.apply(load_local_config_file(path))
    workloads = []
    for w in state.workloads():
        d = workload_to_dict(w)
        d["services"] = {k: {str(p): t for p, t in v.items()} for k, v in w.services.items()}
        workloads.append(d)
    services = []
    for s in state.services():
        d = service_to_dict(s, state)
        d.pop("endpoints")
        services.append(d)
    policies = [policy_to_dict(p) for p in state.policies()]
    doc = yaml.safe_dump({"workloads": workloads, "services": services, "policies": policies})
    again = ProxyState()
    again.apply(parse_local_config(doc))
    assert state_dump(again) == state_dump(state)


@pytest.mark.parametrize(
    ("doc", "expected"),
    [
        # A typo deep in the document gets the hint of the mapping it is in.
        (
            "workloads: [{uid: u, namespace: n, waypoint: {destination: n/w, hboneMtlsPrt: 1}}]",
            "workloads[0].waypoint.hboneMtlsPrt: unknown field (did you mean 'hboneMtlsPort'?)",
        ),
        # Strings are strings, as in ztunnel's serde schema.
        (
            "workloads: [{uid: u, namespace: 5}]",
            "workloads[0].namespace: expected a string, got an integer",
        ),
        (
            "services: [{name: s, namespace: n, hostname: h, canonical: maybe}]",
            "services[0].canonical: expected a boolean, got a string",
        ),
        (
            "policies: [{name: p, namespace: n, rules: [[[{destinationPorts: [80, 70000]}]]]}]",
            "policies[0].rules[0][0][0].destinationPorts[1]: 70000 is out of range 0..65535",
        ),
    ],
)
def test_schema_errors_name_the_field(doc: str, expected: str) -> None:
    with pytest.raises(LocalConfigError) as info:
        parse_local_config(doc)
    assert f"{info.value.path}: {info.value.reason}" == expected


def test_weighted_waypoints_in_ztunnels_shape() -> None:
    doc = """
services:
  - name: s
    namespace: default
    hostname: s.default.svc.cluster.local
    waypoint: {destination: "/10.0.0.100"}
    weightedWaypoints:
      - {destination: {destination: "/10.0.0.100"}, weight: 90}
      - destination: {destination: "default/canary.default.svc.cluster.local", hboneMtlsPort: 15009}
        weight: 10
"""
    (s,) = parse_local_config(doc).services
    assert [
        (str(w.destination.destination), w.destination.hbone_mtls_port, w.weight)
        for w in s.weighted_waypoints
    ] == [
        ("/10.0.0.100", 15008, 90),
        ("default/canary.default.svc.cluster.local", 15009, 10),
    ]


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ("{weight: 5}", "weightedWaypoints[0]"),
        ("{destination: {destination: '/10.0.0.1'}, weight: -1}", "weightedWaypoints[0].weight"),
        ("{destination: {destination: 'nope'}}", "weightedWaypoints[0].destination"),
    ],
)
def test_bad_weighted_waypoints_name_their_path(entry: str, message: str) -> None:
    doc = f"services: [{{name: s, namespace: n, hostname: h, weightedWaypoints: [{entry}]}}]"
    with pytest.raises(LocalConfigError) as e:
        parse_local_config(doc)
    assert message in str(e.value)


def test_ipv6_text_forms_read_as_ztunnel_reads_them() -> None:
    """Rust's IpAddr/IpNet: any standard spelling, canonicalised; an IPv4-mapped address stays
    IPv6 (ztunnel never turns it into IPv4)."""
    batch = parse_local_config(
        """
workloads:
  - {uid: u1, name: a, namespace: default,
     workloadIps: ["FD00:0:0:0:0:0:0:1", "fd00::0:2", "::ffff:10.0.0.1"]}
services:
  - {name: s, namespace: default, hostname: s.default.svc,
     vips: ["/FD00:96:0::10", "/::ffff:10.96.0.10"]}
policies:
  - {name: p, namespace: default, action: Deny,
     rules: [[[{sourceIps: ["FD00:0::/16", "::ffff:10.0.0.0/104"]}]]]}
"""
    )
    ip, net = ipaddress.ip_address, ipaddress.ip_network
    (w,) = batch.workloads
    assert w.workload_ips == (ip("fd00::1"), ip("fd00::2"), ipaddress.IPv6Address("::ffff:a00:1"))
    assert all(a.version == 6 for a in w.workload_ips)
    (s,) = batch.services
    assert [v.address for v in s.vips] == [ip("fd00:96::10"), ip("::ffff:10.96.0.10")]
    assert s.vips[1].address.version == 6
    (p,) = batch.policies
    assert p.rules[0][0][0].source_ips == (net("fd00::/16"), net("::ffff:10.0.0.0/104"))
