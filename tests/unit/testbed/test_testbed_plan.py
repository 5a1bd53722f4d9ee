"""The testbed's address plan and local-config writer (pure: no namespaces are made)."""

from __future__ import annotations

import ipaddress

import pytest

from tools.testbed.plan import (
    NodePlan,
    PlanError,
    TestbedPlan,
    ipv6_vip,
    make_plan,
    render_local_config,
)
from ztunnel_py.state.model import InboundProtocol, IpFamily, NetworkAddress
from ztunnel_py.state.store import ProxyState
from ztunnel_py.xds.local import parse_local_config


def test_two_by_two_layout() -> None:
    plan = make_plan("t1", nodes=2, pods_per_node=2)
    assert [n.name for n in plan.nodes] == ["node-0", "node-1"]
    assert [p.name for p in plan.pods] == ["pod-0-0", "pod-0-1", "pod-1-0", "pod-1-1"]
    for pod in plan.pods:
        node = plan.node(pod.node)
        assert ipaddress.ip_address(pod.ip) in ipaddress.ip_network(node.pod_cidr)
        assert pod.gateway == node.gateway
        assert pod.cgroup == f"ztunnel-py-testbed/{node.netns}/{pod.name}"
        assert pod.netns_path == f"/run/netns/{pod.netns}"
    assert len({p.ip for p in plan.pods}) == 4
    assert len({n.fabric_ip for n in plan.nodes}) == 2
    assert ipaddress.ip_network(plan.nodes[0].pod_cidr) != ipaddress.ip_network(
        plan.nodes[1].pod_cidr
    )


@pytest.mark.parametrize(
    ("pods", "prefixlen", "node1_cidr"),
    [(240, 24, "10.244.1.0/24"), (241, 23, "10.244.2.0/23"), (500, 22, "10.244.4.0/22")],
)
def test_nodes_of_more_than_240_pods_get_a_wider_subnet(
    pods: int, prefixlen: int, node1_cidr: str
) -> None:
    plan = make_plan("big", nodes=2, pods_per_node=pods)
    assert plan.nodes[1].pod_cidr == node1_cidr
    for node in plan.nodes:
        subnet = ipaddress.ip_network(node.pod_cidr)
        assert node.prefixlen == prefixlen
        hosts = [ipaddress.ip_address(p.ip) for p in plan.pods_on(node.name)]
        assert len(set(hosts)) == pods
        gateway = ipaddress.ip_address(node.gateway)
        assert all(h in subnet and h not in (subnet.broadcast_address, gateway) for h in hosts)
        assert all(p.prefixlen == prefixlen for p in plan.pods_on(node.name))
    vips = [ipaddress.ip_address(s.vip) for s in plan.services]
    assert len(set(vips)) == pods + 1  # app-<j> for every pod index, and echo
    assert all(v in ipaddress.ip_network(f"10.96.0.0/{prefixlen}") for v in vips)
    state = ProxyState()
    state.apply(parse_local_config(render_local_config(plan)))
    assert len(state.workloads_on_node("node-1")) == pods


def test_every_name_carries_the_testbed_prefix() -> None:
    plan = make_plan("abc", nodes=3, pods_per_node=4)
    names = [plan.fabric_netns] + [n.netns for n in plan.nodes] + [p.netns for p in plan.pods]
    assert all(name.startswith("zttb-abc-") for name in names)
    assert len(set(names)) == len(names)
    assert all(
        len(p.node_ifname) <= 15 and len(n.fabric_ifname) <= 15
        for p in plan.pods
        for n in plan.nodes
    )


def test_services_span_nodes() -> None:
    plan = make_plan("t2", nodes=3, pods_per_node=2)
    by_name = {s.name: s for s in plan.services}
    assert set(by_name) == {"app-0", "app-1", "echo"}
    assert {plan.pod(p).node for p in by_name["app-0"].endpoints} == {"node-0", "node-1", "node-2"}
    assert len(by_name["echo"].endpoints) == 6
    assert len({s.vip for s in plan.services}) == 3
    assert by_name["app-1"].ports == {80: 8080, 9000: 9000}


@pytest.mark.parametrize(
    ("kwargs", "complaint"),
    [
        ({"tag": "Bad_Tag"}, "tag"),
        ({"tag": "waytoolongtag"}, "tag"),
        ({"nodes": 0}, "nodes"),
        ({"pods_per_node": 1001}, "pods_per_node"),
        ({"nodes": 65, "pods_per_node": 500}, "holds 64 node subnets of /22"),
        ({"pods_per_node": 300, "service_cidr": "10.96.0.0/24"}, "too small for 300 services"),
        ({"pod_supernet": "10.0.0.0/24"}, "pod_supernet"),
        ({"fabric_cidr": "10.244.5.0/24"}, "overlap"),
        ({"service_cidr": "not-a-cidr"}, "service_cidr"),
    ],
)
def test_bad_parameters_are_refused(kwargs: dict[str, object], complaint: str) -> None:
    with pytest.raises(PlanError, match=complaint):
        make_plan(**kwargs)  # type: ignore[arg-type]


def test_plan_round_trips_through_the_state_file_form() -> None:
    plan = make_plan("t3", nodes=2, pods_per_node=3)
    assert TestbedPlan.from_dict(plan.to_dict()) == plan


def test_local_config_loads_as_ztunnel_would() -> None:
    plan = make_plan("t4", nodes=2, pods_per_node=2)
    batch = parse_local_config(render_local_config(plan))
    state = ProxyState()
    state.apply(batch)

    assert {w.uid for w in state.workloads()} == {p.uid for p in plan.pods}
    for pod in plan.pods:
        w = state.find_workload(
            namespace=pod.namespace, name=pod.name, service_account=pod.service_account
        )
        assert w is not None
        assert w.uid == pod.uid
        assert w.protocol is InboundProtocol.HBONE
        assert w.node == pod.node
        assert [str(ip) for ip in w.workload_ips] == [pod.ip]
        assert w.identity == pod.identity
    assert len(state.workloads_on_node("node-1")) == 2

    app0 = next(s for s in plan.services if s.name == "app-0")
    svc = state.service_by_vip(NetworkAddress("", ipaddress.ip_address(app0.vip)))
    assert svc is not None and svc.hostname == "app-0.default.svc.cluster.local"
    endpoints = state.endpoints(svc.key)
    assert {state.workload(uid).node for uid in endpoints} == {"node-0", "node-1"}  # type: ignore[union-attr]
    assert all(ep.ports == {80: 8080, 9000: 9000} for ep in endpoints.values())
    assert set(svc.subject_alt_names) == {"spiffe://cluster.local/ns/default/sa/app-0"}


@pytest.mark.parametrize("family", ["ipv6", "dual"])
def test_ipv6_and_dual_stack_layouts(family: str) -> None:
    plan = make_plan("t5", nodes=2, pods_per_node=2, ip_family=family)
    for pod in plan.pods:
        node = plan.node(pod.node)
        ip6 = ipaddress.ip_address(pod.address(6))
        assert ip6 in ipaddress.ip_network(node.pod_cidr6)
        assert ip6 in ipaddress.ip_network("fd00:10:244::/48")
        assert int(ip6) & 0xFFFF == 10 + pod.index  # fd00:10:244:<node>::<10+pod>
        assert pod.ip == str(ip6) and pod.gateway == node.gateway6  # IPv6 is primary
        assert (pod.prefixlen, ipaddress.ip_address(node.gateway6)) == (64, node_net(node) + 1)
        if family == "dual":
            assert pod.addresses == (str(ip6), pod.address(4))
            assert ipaddress.ip_address(pod.address(4)) in ipaddress.ip_network(node.pod_cidr)
        else:
            assert pod.addresses == (str(ip6),)
            with pytest.raises(KeyError, match="no IPv4 address"):
                pod.address(4)
    assert [n.fabric_ip6 for n in plan.nodes] == ["fd00:192:168:244::1", "fd00:192:168:244::2"]
    assert plan.nodes[0].pod_cidr6 != plan.nodes[1].pod_cidr6
    echo = next(s for s in plan.services if s.name == "echo")
    want = ("fd00:10:96::2",) if family == "ipv6" else ("fd00:10:96::2", "10.96.0.2")
    assert (echo.vip, echo.vips) == (want[0], want)
    assert echo.ip_families == {"ipv6": "IPv6", "dual": "Dual"}[family]
    assert TestbedPlan.from_dict(plan.to_dict()) == plan


def node_net(node: NodePlan) -> ipaddress.IPv6Address:
    return ipaddress.IPv6Network(node.pod_cidr6).network_address


def test_ipv4_plan_has_no_ipv6_parts() -> None:
    plan = make_plan("t6", nodes=1, pods_per_node=1)
    assert plan.versions == (4,)
    assert (plan.nodes[0].pod_cidr6, plan.nodes[0].fabric_ip6) == ("", "")
    assert plan.pods[0].addresses == (plan.pods[0].ip,)
    assert all(s.ip_families == "IPv4" and s.vips == (s.vip,) for s in plan.services)


def test_ipv6_vip_twins_keep_the_host_part() -> None:
    assert ipv6_vip("10.96.0.101") == "fd00:10:96::65"
    assert ipv6_vip("10.96.1.253") == "fd00:10:96::1fd"  # offset 509, past a /24
    with pytest.raises(PlanError, match=r"10\.96\.0\.0/16"):
        ipv6_vip("10.97.0.1")
    with pytest.raises(PlanError, match="ip_family"):
        make_plan("t7", ip_family="ipv5")


@pytest.mark.parametrize("family", ["ipv6", "dual"])
def test_dual_stack_local_config_loads_both_addresses_and_vips(family: str) -> None:
    plan = make_plan("t8", nodes=2, pods_per_node=1, ip_family=family)
    state = ProxyState()
    state.apply(parse_local_config(render_local_config(plan)))
    for pod in plan.pods:
        w = state.workload(pod.uid)
        assert w is not None
        assert [str(ip) for ip in w.workload_ips] == list(pod.addresses)
    for svc in plan.services:
        for vip in svc.vips:
            found = state.service_by_vip(NetworkAddress("", ipaddress.ip_address(vip)))
            assert found is not None and found.hostname == svc.hostname
            assert found.ip_families is IpFamily(svc.ip_families)
