"""A 2x2 mesh of real daemons, enrolled through the fake istio-cni agent, carrying traffic.

One mesh per redirect mode serves every test here (none of them disturbs it for the next):
enrolment (each pod Up, listeners inside its own netns), pod-to-VIP traffic whose only
endpoint is on the other node, in both directions, and the destination's view of the client's
mTLS identity.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.netns.e2e.support import (
    PROXY_PORTS,
    accepted_on,
    captured_cookies,
    exchange,
    held_connection,
    hostport,
    mesh_tag,
    metric_lines,
    mode_family_params,
    netns_cookies,
    proxy_listeners,
    socket_owners,
    workload_state,
)
from tools.testbed import cgroup2_mount
from tools.testbed.mesh import ExtraService, Mesh, MeshOptions
from ztunnel_py.testing.daemon import Daemon
from ztunnel_py.testing.poll import wait_until
from ztunnel_py.testing.privileged import require

pytestmark = [pytest.mark.root]

# Services whose only endpoint sits on one node, so a client on the other node must cross.
ON_NODE_1 = ExtraService("only-n1", "10.96.0.101", ("pod-1-1",))
ON_NODE_0 = ExtraService("only-n0", "10.96.0.100", ("pod-0-1",))
MIB = 1 << 20


@pytest.fixture(scope="module", params=mode_family_params())
def mesh(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Mesh]:
    require(cgroup2_mount() is not None, "a cgroup v2 mount (testbed pods live in cgroups)")
    redirect, family = request.param
    options = MeshOptions(
        tag=mesh_tag("tr", redirect, family),
        redirect=redirect,
        ip_family=family,
        services=(ON_NODE_1, ON_NODE_0),
    )
    shared = Mesh(options, Path(tmp_path_factory.mktemp(options.tag)))
    try:
        shared.up()
        yield shared
    finally:
        shared.down()


def test_every_pod_is_up_with_its_listeners_inside_its_own_netns(mesh: Mesh) -> None:
    daemon_pids = {d.proc.pid for d in mesh.daemons.values()}
    for node in mesh.plan.nodes:
        daemon = mesh.daemons[node.name]
        pods = mesh.plan.pods_on(node.name)
        # Each daemon holds exactly its node's pods, all with a running proxy.
        assert workload_state(daemon) == {pod.uid: "Up" for pod in pods}
        dump = daemon.config_dump()
        assert dump["dataPlane"]["redirectMode"] == mesh.options.redirect
        for pod in pods:
            info = dump["workloadState"][pod.uid]["info"]
            assert (info["name"], info["serviceAccount"]) == (pod.name, pod.service_account)
            assert proxy_listeners(mesh, pod.name) == {p: {daemon.proc.pid} for p in PROXY_PORTS}
        if mesh.options.redirect == "ebpf":
            cookies = netns_cookies(daemon)
            assert set(cookies) == {ip for pod in pods for ip in pod.addresses}
            assert captured_cookies(daemon) == set(cookies.values())
            assert len(dump["dataPlane"]["bpf"]["attachPoints"]["podLinks"]) == len(pods)
    # The daemons run in the host netns but listen there on none of the proxy ports.
    host = socket_owners(f"/proc/{os.getpid()}/ns/net", "-l")
    assert not any(host.get(port, set()) & daemon_pids for port in PROXY_PORTS)


@pytest.mark.parametrize(
    ("client", "service"), [("pod-0-0", ON_NODE_1), ("pod-1-0", ON_NODE_0)], ids=["n0-n1", "n1-n0"]
)
def test_pod_to_service_vip_across_nodes_round_trips_intact(
    mesh: Mesh, client: str, service: ExtraService
) -> None:
    (endpoint,) = service.endpoints
    assert mesh.pod(client).node != mesh.pod(endpoint).node
    # Every VIP of the service: on a dual-stack testbed, the IPv6 and the IPv4 one.
    for vip in service.vips(mesh.options.ip_family):
        echoed = mesh.client(client, "echo", vip, 9000, "--bytes", str(MIB))
        assert echoed["result"] == "ok", echoed
        assert echoed["sent"] == echoed["received"] == MIB
        assert echoed["sha256"] == echoed["expected_sha256"]
        assert echoed["peer"] == hostport(vip, 9000)  # the application still sees the VIP
        answer = mesh.client(client, "http", vip, 80)
        assert (answer["result"], answer["status"]) == ("ok", "200"), answer
        assert answer["body"] == f"{endpoint}\n"  # the remote endpoint answered


def test_plaintext_from_outside_the_mesh_reaches_the_pod_through_its_proxy(mesh: Mesh) -> None:
    pod = mesh.pod("pod-0-0")
    node_netns = f"/run/netns/{mesh.plan.node('node-0').netns}"  # not a pod: no HBONE
    daemon = mesh.daemons["node-0"]
    for ip in pod.addresses:
        assert exchange(node_netns, ip, 9000, b"plaintext") == ("ok", b"plaintext")
    with held_connection(node_netns, pod.ip, 9000):
        # The daemon holds the accepted end: :15006 after REDIRECT, the original :9000 after
        # sk_lookup (which keeps the destination address).
        port = 15006 if mesh.options.redirect == "iptables" else 9000
        assert daemon.proc.pid in accepted_on(mesh, pod.name, port)


def _policies(daemon: Daemon) -> set[str]:
    return {p["name"] for p in daemon.config_dump()["policies"]}


def test_destination_verifies_the_clients_mtls_identity(mesh: Mesh) -> None:
    src_node, dst_node = mesh.daemons["node-0"], mesh.daemons["node-1"]
    allowed, denied = mesh.pod("pod-0-0"), mesh.pod("pod-0-1")
    (endpoint,) = (mesh.pod(p) for p in ON_NODE_1.endpoints)
    assert allowed.service_account != denied.service_account

    # Each side holds a certificate for its own pods' identities.
    def available(daemon: Daemon) -> set[str]:
        certs = daemon.config_dump()["certificates"]
        return {c["identity"] for c in certs if c["state"] == "Available" and c["certChain"]}

    assert {allowed.identity, denied.identity} <= available(src_node)
    assert endpoint.identity in available(dst_node)

    # A DENY on the client's principal can only match if the destination verified who it is.
    deny = {
        "name": "e2e-deny-principal",
        "namespace": "default",
        "scope": "Namespace",
        "action": "Deny",
        "rules": [
            [
                [{"principals": [denied.identity.removeprefix("spiffe://")]}],
                [{"destinationPorts": [9000]}],
            ]
        ],
    }
    mesh.write_config([deny])
    try:
        wait_until(lambda: "e2e-deny-principal" in _policies(dst_node), "the policy on node-1")
        refused = mesh.client(denied.name, "echo", mesh.vip(ON_NODE_1), 9000, "--bytes", "4096")
        assert refused["received"] == 0, refused
        served = mesh.client(allowed.name, "echo", mesh.vip(ON_NODE_1), 9000, "--bytes", str(MIB))
        assert served["result"] == "ok", served
        assert served["sha256"] == served["expected_sha256"]

        # The destination names the refused client by the SPIFFE identity of its certificate.
        refusals = [
            line
            for line in dst_node.log().splitlines()
            if "inbound HBONE request refused (401)" in line and f"({denied.identity})" in line
        ]
        assert refusals, dst_node.log()[-3000:]
        assert all(denied.ip in line for line in refusals)
        assert f"({allowed.identity})" not in "".join(
            line for line in dst_node.log().splitlines() if "refused" in line
        )
        opened = metric_lines(dst_node, "istio_tcp_connections_opened_total")
        if opened:  # once connection telemetry is exported, it names the verified principal
            assert any(
                'reporter="destination"' in line
                and f'source_principal="{allowed.identity}"' in line
                for line in opened
            ), opened
    finally:
        mesh.write_config()
        wait_until(
            lambda: not (_policies(src_node) | _policies(dst_node)), "the policy to be gone again"
        )
