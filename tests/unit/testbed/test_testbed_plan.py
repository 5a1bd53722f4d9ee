"""The testbed's address plan and local-config writer (pure: no namespaces are made)."""

from __future__ import annotations

import ipaddress

import pytest

from tools.testbed.plan import PlanError, TestbedPlan, make_plan, render_local_config
from ztunnel_py.state.model import InboundProtocol, NetworkAddress
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
        ({"pods_per_node": 241}, "pods_per_node"),
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
