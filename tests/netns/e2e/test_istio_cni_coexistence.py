"""eBPF mode next to a stock istio-cni: its in-pod iptables rules stay installed in every pod.

One eBPF mesh whose mesh pods also carry istio-cni's in-pod rules (``redirect/iptables.py``),
with pod-1-0 left out of the mesh:

- mesh connections are redirected once, by the BPF connect hook (rewritten to 127.0.0.1:15001
  before netfilter sees them): the nat REDIRECT rule to :15001 counts no packet for them;
- non-mesh egress, which the kernel programs leave alone, is REDIRECTed to :15001 by iptables:
  the proxy takes its destination from conntrack (``SO_ORIGINAL_DST``) and passes it through;
- inbound plaintext REDIRECTed to :15006 by iptables (before ``sk_lookup`` runs) reaches the
  address it was sent to, not the proxy's own port.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.netns.e2e.support import (
    Scrape,
    accepted_on,
    exchange,
    held_connection,
    mesh_tag,
    workload_state,
)
from tools.testbed import cgroup2_mount
from tools.testbed.mesh import ExtraService, Mesh, MeshOptions
from tools.testbed.plan import ECHO_PORT
from ztunnel_py.redirect import iptables
from ztunnel_py.testing.poll import HANG_GUARD_S
from ztunnel_py.testing.privileged import require

pytestmark = [pytest.mark.root, pytest.mark.bpf]

ON_NODE_1 = ExtraService("only-n1", "10.96.0.101", ("pod-1-1",))
OUTSIDE_POD = "pod-1-0"  # not in the mesh: no workload, never enrolled, no in-pod rules
CLIENT_POD = "pod-0-0"


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    require(cgroup2_mount() is not None, "a cgroup v2 mount (testbed pods live in cgroups)")
    options = MeshOptions(
        tag=mesh_tag("cx", "ebpf"),
        redirect="ebpf",
        inpod_rules=True,
        services=(ON_NODE_1,),
        outside=(OUTSIDE_POD,),
    )
    shared = Mesh(options, Path(tmp_path_factory.mktemp(options.tag)))
    try:
        shared.up()
        yield shared
    finally:
        shared.down()


def redirect_packets(netns_path: str, to_port: int) -> int:
    """Packets counted so far by the in-pod nat rules REDIRECTing to ``to_port`` (IPv4)."""
    out = subprocess.run(
        ["nsenter", f"--net={netns_path}", "--", "iptables-save", "-c", "-t", "nat"],
        capture_output=True,
        text=True,
        check=True,
        timeout=HANG_GUARD_S,
    ).stdout
    total = 0
    for line in out.splitlines():
        m = re.match(r"\[(\d+):\d+\] -A ISTIO_\w+ .*-j REDIRECT --to-ports (\d+)$", line)
        if m and int(m.group(2)) == to_port:
            total += int(m.group(1))
    return total


def bpf_events(mesh: Mesh, event: str) -> float:
    return Scrape(mesh.daemons["node-0"]).total("ztunnel_bpf_events_total", event=event)


def test_the_mesh_runs_in_ebpf_mode_with_istio_cni_rules_in_every_mesh_pod(mesh: Mesh) -> None:
    daemon = mesh.daemons["node-0"]
    assert daemon.config_dump()["dataPlane"]["redirectMode"] == "ebpf"
    assert workload_state(daemon) == {p.uid: "Up" for p in mesh.plan.pods_on("node-0")}
    assert iptables.is_installed(mesh.pod(CLIENT_POD).netns_path)
    assert not iptables.is_installed(mesh.pod(OUTSIDE_POD).netns_path)


def test_mesh_connections_are_redirected_by_bpf_alone(mesh: Mesh) -> None:
    netns = mesh.pod(CLIENT_POD).netns_path
    nat_before = redirect_packets(netns, 15001)
    bpf_before = bpf_events(mesh, "out_redirected")

    echoed = mesh.client(CLIENT_POD, "echo", ON_NODE_1.vip, ECHO_PORT, "--bytes", "50000")

    assert echoed["result"] == "ok", echoed
    assert echoed["received"] == 50000
    assert bpf_events(mesh, "out_redirected") == bpf_before + 1
    assert redirect_packets(netns, 15001) == nat_before  # iptables never touched it


def test_non_mesh_egress_redirected_by_iptables_is_passed_through(mesh: Mesh) -> None:
    client = mesh.pod(CLIENT_POD)
    outside = mesh.pod(OUTSIDE_POD)
    nat_before = redirect_packets(client.netns_path, 15001)
    daemon_pid = mesh.daemons["node-0"].proc.pid

    # Not a mesh destination: the connect hook lets it go; istio-cni's rule sends it to
    # :15001, where only conntrack knows where it was going.
    with held_connection(client.netns_path, outside.ip, ECHO_PORT):
        assert accepted_on(mesh, CLIENT_POD, 15001) == {daemon_pid}
    assert redirect_packets(client.netns_path, 15001) == nat_before + 1

    echoed = mesh.client(CLIENT_POD, "echo", outside.ip, ECHO_PORT, "--bytes", "50000")
    assert echoed["result"] == "ok", echoed
    assert echoed["received"] == 50000


def test_inbound_plaintext_redirected_by_iptables_reaches_its_original_port(mesh: Mesh) -> None:
    pod = mesh.pod(CLIENT_POD)
    node_netns = f"/run/netns/{mesh.plan.node('node-0').netns}"  # not a pod: never enrolled
    daemon_pid = mesh.daemons["node-0"].proc.pid
    nat_before = redirect_packets(pod.netns_path, 15006)

    # nat PREROUTING rewrote it to <pod>:15006 before sk_lookup could steer it.
    with held_connection(node_netns, pod.ip, ECHO_PORT):
        assert accepted_on(mesh, CLIENT_POD, 15006) == {daemon_pid}
    assert redirect_packets(pod.netns_path, 15006) == nat_before + 1
    assert exchange(node_netns, pod.ip, ECHO_PORT, b"hello") == ("ok", b"hello")
