"""``TRANSPARENT_NETWORK_POLICIES`` (beyond ztunnel, istio/ztunnel#1665): HBONE between pods
keeps the application's port on the wire, so a port-based network policy that allows only
the application's port (here: node-1 drops every forwarded packet to port 15008, as a
NetworkPolicy without 15008 would) still lets mesh traffic through. The receiving pod's
redirection (sk_lookup, or the in-pod iptables rule) hands it to the proxy's :15008."""

from __future__ import annotations

import subprocess

import pytest

from tests.netns.e2e.support import MODES, MeshMaker
from tools.testbed.mesh import Mesh
from ztunnel_py.config import HBONE_SOURCE_PORTS
from ztunnel_py.testing.poll import HANG_GUARD_S

pytestmark = [pytest.mark.root]


def _in_netns(netns_path: str, *argv: str) -> str:
    return subprocess.run(
        ["nsenter", f"--net={netns_path}", "--", *argv],
        capture_output=True,
        text=True,
        check=True,
        timeout=HANG_GUARD_S,
    ).stdout


def _hbone_connections(mesh: Mesh, pod: str, peer: str) -> list[tuple[int, int]]:
    """(local port, remote port) of the established TCP connections in ``pod`` to ``peer``."""
    out = _in_netns(mesh.pod(pod).netns_path, "ss", "-Htn", "state", "established", "dst", peer)
    pairs = []
    for line in out.splitlines():
        local, remote = [f for f in line.split() if ":" in f][:2]
        pairs.append((int(local.rsplit(":", 1)[1]), int(remote.rsplit(":", 1)[1])))
    return pairs


@pytest.mark.parametrize("redirect", MODES)
def test_hbone_uses_the_app_port_on_the_wire_and_passes_a_port_policy(
    make_mesh: MeshMaker, redirect: str
) -> None:
    mesh = make_mesh("tnp", redirect, pods_per_node=1, env={"TRANSPARENT_NETWORK_POLICIES": "true"})
    client, server = mesh.pod("pod-0-0"), mesh.pod("pod-1-0")
    node = f"/run/netns/{mesh.plan.node('node-1').netns}"
    _in_netns(node, "iptables", "-I", "FORWARD", "-p", "tcp", "--dport", "15008", "-j", "DROP")

    result = mesh.client(client.name, "echo", server.ip, 9000, "--bytes", "65536")
    assert result["result"] == "ok", result
    assert result["sha256"] == result["expected_sha256"]

    # The pooled HBONE connection from the client's pod: to the app port, from the HBONE
    # source-port range; nothing to 15008.
    wire = _hbone_connections(mesh, client.name, server.ip)
    assert wire, "no established connection to the server pod"
    assert all(remote == 9000 and local in HBONE_SOURCE_PORTS for local, remote in wire), wire
    # The receiving daemon served it as HBONE (its access log names the client's identity).
    daemon = mesh.daemons["node-1"]
    assert client.identity in daemon.log()
