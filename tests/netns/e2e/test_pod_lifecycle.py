"""Pods leaving the mesh through the fake istio-cni agent, against the real daemons.

A deleted pod loses its listeners (inside its netns) and its place in ``workloadState``; in
eBPF mode the kernel stops capturing its connections. An agent that restarts with a snapshot
missing a pod makes the daemon drop that pod and keep serving the others.
"""

from __future__ import annotations

import pytest

from tests.netns.e2e.support import (
    MODES,
    PROXY_PORTS,
    MeshMaker,
    bpf_dump,
    captured_cookies,
    netns_cookies,
    proxy_listeners,
    workload_state,
)
from tools.testbed.mesh import ExtraService, Mesh
from ztunnel_py.testing.poll import wait_until

pytestmark = [pytest.mark.root]

ON_NODE_1 = ExtraService("only-n1", "10.96.0.101", ("pod-1-1",))


def assert_serves_across_nodes(mesh: Mesh, client: str) -> None:
    for vip in ON_NODE_1.vips(mesh.options.ip_family):
        echoed = mesh.client(client, "echo", vip, 9000, "--bytes", "200000")
        assert echoed["result"] == "ok", echoed
        assert echoed["sha256"] == echoed["expected_sha256"]


def pod_link_count(mesh: Mesh, node: str) -> int:
    return len(bpf_dump(mesh.daemons[node])["attachPoints"]["podLinks"])


@pytest.mark.parametrize("ip_family", ["ipv4", "dual"])  # dual: both families at once
@pytest.mark.parametrize("redirect", MODES)
def test_deleted_pod_loses_its_listeners_state_and_capture(
    make_mesh: MeshMaker, redirect: str, ip_family: str
) -> None:
    mesh = make_mesh("rm", redirect, ip_family=ip_family, services=(ON_NODE_1,))
    daemon = mesh.daemons["node-0"]
    gone, kept = mesh.pod("pod-0-1"), mesh.pod("pod-0-0")
    assert proxy_listeners(mesh, gone.name) == {p: {daemon.proc.pid} for p in PROXY_PORTS}
    cookies = netns_cookies(daemon) if redirect == "ebpf" else {}

    assert mesh.loop is not None
    assert mesh.loop.run(mesh.agents["node-0"].del_pod(gone.uid)) == ""  # acked once removed

    assert workload_state(daemon) == {kept.uid: "Up"}
    assert proxy_listeners(mesh, gone.name) == {}
    assert proxy_listeners(mesh, kept.name) == {p: {daemon.proc.pid} for p in PROXY_PORTS}
    assert_serves_across_nodes(mesh, kept.name)
    if redirect == "ebpf":
        assert captured_cookies(daemon) == {cookies[kept.ip]}
        assert pod_link_count(mesh, "node-0") == 1
        # Not captured any more: a VIP is just an unroutable address to the pod now ...
        to_vip = mesh.client(gone.name, "echo", mesh.vip(ON_NODE_1), 9000)
        assert to_vip["result"] == "error", to_vip
        assert "unreachable" in to_vip["error"]
        # ... and a pod IP is reached in plaintext (the peer's node captures it inbound).
        direct = mesh.client(gone.name, "echo", mesh.pod("pod-1-1").ip, 9000, "--bytes", "4096")
        assert direct["result"] == "ok", direct
    else:
        # istio-cni's in-pod rules still redirect, but nothing listens for the pod any more.
        refused = mesh.client(gone.name, "echo", mesh.vip(ON_NODE_1), 9000)
        assert refused["result"] == "refused", refused


@pytest.mark.parametrize("redirect", MODES)
def test_agent_restart_without_a_pod_removes_it_and_keeps_serving_the_rest(
    make_mesh: MeshMaker, redirect: str
) -> None:
    mesh = make_mesh("ar", redirect, services=(ON_NODE_1,))
    daemon = mesh.daemons["node-0"]
    agent = mesh.agents["node-0"]
    dropped, kept = mesh.pod("pod-0-1"), mesh.pod("pod-0-0")
    cookies = netns_cookies(daemon) if redirect == "ebpf" else {}
    assert mesh.loop is not None

    mesh.loop.run(agent.restart(drop=[dropped.uid]))  # the pod was deleted while it was down
    mesh.loop.run(agent.wait_snapshots(2), timeout=30)  # the daemon reconnected and took it

    assert daemon.proc.poll() is None  # the same process, not a restarted one
    wait_until(lambda: workload_state(daemon) == {kept.uid: "Up"}, "the dropped pod to go")
    assert proxy_listeners(mesh, dropped.name) == {}
    assert proxy_listeners(mesh, kept.name) == {p: {daemon.proc.pid} for p in PROXY_PORTS}
    assert_serves_across_nodes(mesh, kept.name)
    if redirect == "ebpf":
        assert captured_cookies(daemon) == {cookies[kept.ip]}
        assert pod_link_count(mesh, "node-0") == 1
