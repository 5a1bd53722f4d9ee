"""The operator's views on a 2x2 mesh of real daemons: live connections in ``/config_dump``
and ``/debug/connections`` (listed while open, gone when closed), ``/debug/pods``, and in eBPF
mode ``/debug/bpf`` against what the kernel itself holds (``bpftool``)."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.netns.e2e.support import MODES, finish_stream, mesh_tag, start_stream
from tools.lab.binaries import LabBinariesMissing, find_binaries
from tools.testbed import cgroup2_mount
from tools.testbed.mesh import ExtraService, Mesh, MeshOptions
from tools.testbed.plan import ECHO_PORT
from ztunnel_py.testing import browser
from ztunnel_py.testing.daemon import Daemon, http
from ztunnel_py.testing.poll import wait_until
from ztunnel_py.testing.privileged import require

pytestmark = [pytest.mark.root]

ON_NODE_1 = ExtraService("only-n1", "10.96.0.104", ("pod-1-1",))
CLIENT, SERVER = "pod-0-0", "pod-1-1"
# Maps whose content only changes with configuration or enrolment (not with each connection).
STABLE_MAPS = ("zt_cfg", "zt_deny", "zt_dst", "zt_local", "zt_pods", "zt_version")


@pytest.fixture(scope="module", params=MODES)
def mesh(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Mesh]:
    require(cgroup2_mount() is not None, "a cgroup v2 mount (testbed pods live in cgroups)")
    redirect: str = request.param
    options = MeshOptions(tag=mesh_tag("dbg", redirect), redirect=redirect, services=(ON_NODE_1,))
    shared = Mesh(options, Path(tmp_path_factory.mktemp(options.tag)))
    try:
        shared.up()
        yield shared
    finally:
        shared.down()


def daemon_of(mesh: Mesh, pod: str) -> Daemon:
    return mesh.daemons[mesh.pod(pod).node]


def listed(mesh: Mesh, pod: str) -> dict[str, list[dict[str, Any]]]:
    """The pod's ``workloadState`` connections in its daemon's ``/config_dump``."""
    state = daemon_of(mesh, pod).config_dump()["workloadState"][mesh.pod(pod).uid]
    assert state["state"] == "Up"
    connections: dict[str, list[dict[str, Any]]] = state["connections"]
    return connections


def debug_connections(mesh: Mesh, pod: str) -> dict[str, Any]:
    view = http(f"{daemon_of(mesh, pod).admin}/debug/connections").json()
    by_workload: dict[str, Any] = view["byWorkload"]
    return by_workload


def test_connections_listed_while_open_and_gone_when_closed(mesh: Mesh) -> None:
    client, server = mesh.pod(CLIENT), mesh.pod(SERVER)
    assert listed(mesh, CLIENT) == {"inbound": [], "outbound": []}
    stream = start_stream(mesh, CLIENT, ON_NODE_1.vip, ECHO_PORT)
    try:
        wait_until(lambda: bool(listed(mesh, SERVER)["inbound"]), "the server side to list it")
        (out,) = listed(mesh, CLIENT)["outbound"]
        assert out["originalDst"] == f"{ON_NODE_1.vip}:{ECHO_PORT}"
        assert out["actualDst"] == f"{server.ip}:15008"
        assert out["protocol"] == "HBONE"
        assert out["src"].rpartition(":")[0] == client.ip
        (inbound,) = listed(mesh, SERVER)["inbound"]
        assert inbound["actualDst"] == f"{server.ip}:{ECHO_PORT}"
        assert inbound["src"].rpartition(":")[0] == client.ip
        assert inbound["originalDst"] == ON_NODE_1.hostname
        assert inbound["protocol"] == "HBONE"
        # /debug/connections shows the same, keyed by the xDS workload
        assert debug_connections(mesh, CLIENT)[client.uid]["outbound"] == [out]
        view = http(f"{daemon_of(mesh, CLIENT).admin}/debug/connections").json()
        (traffic,) = view["traffic"]  # the same connection with its bytes so far
        assert traffic["direction"] == "outbound" and traffic["dst"] == f"{server.ip}:15008"
        assert traffic["bytesTowardDestination"] >= 0 and traffic["ageSeconds"] >= 0
        (pool,) = view["pools"][client.uid]
        assert f"{server.ip}:15008" in pool["key"] and pool["connections"][0]["openStreams"] == 1
    finally:
        finish_stream(stream)
    wait_until(
        lambda: listed(mesh, CLIENT)["outbound"] == [] and listed(mesh, SERVER)["inbound"] == [],
        "both sides to forget the closed connection",
    )
    assert client.uid not in debug_connections(mesh, CLIENT)


def test_pods_view_and_shape_istioctl_reads(mesh: Mesh) -> None:
    for node, daemon in mesh.daemons.items():
        pods = {p["uid"]: p for p in http(f"{daemon.admin}/debug/pods").json()}
        expected = mesh.plan.pods_on(node)
        assert set(pods) == {p.uid for p in expected}
        for plan in expected:
            assert pods[plan.uid]["state"] == "Up" and pods[plan.uid]["ips"] == [plan.ip]
        # istioctl's WorkloadState: state, connections{inbound[], outbound[]}, info{...}
        for entry in daemon.config_dump()["workloadState"].values():
            assert set(entry) == {"state", "connections", "info"}
            assert set(entry["connections"]) == {"inbound", "outbound"}
            assert {"name", "namespace", "serviceAccount"} <= set(entry["info"])
        text = http(f"{daemon.admin}/debug/dump").text
        assert "PRIVATE KEY" not in text


def bpftool_entries(pin: Path) -> list[dict[str, Any]]:
    proc = subprocess.run(
        ["bpftool", "-j", "map", "dump", "pinned", str(pin)],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    entries: list[dict[str, Any]] = json.loads(proc.stdout)
    return entries


def key_bytes(entry: dict[str, Any]) -> bytes:
    return bytes(int(b, 16) for b in entry["key"])


def test_bpf_view_matches_the_kernel(mesh: Mesh) -> None:
    if mesh.options.redirect != "ebpf":
        for daemon in mesh.daemons.values():  # nothing loaded, nothing shown
            assert http(f"{daemon.admin}/debug/bpf").json() is None
            assert http(f"{daemon.admin}/debug/redirect").json()["mode"] == "iptables"
        return
    require(shutil.which("bpftool") is not None, "bpftool is not installed")
    for node, daemon in mesh.daemons.items():
        view = http(f"{daemon.admin}/debug/bpf").json()
        maps = view["maps"]
        pin_maps = mesh.bpf_pin_path(node) / "maps"
        for name in STABLE_MAPS:
            kernel = bpftool_entries(pin_maps / name)
            assert len(maps[name]) == len(kernel), name
        kernel_cookies = {
            int.from_bytes(key_bytes(e)[:8], "little")
            for e in bpftool_entries(pin_maps / "zt_pods")
        }
        assert {e["netnsCookie"] for e in maps["zt_pods"]} == kernel_cookies
        pods = {p["netnsCookie"] for p in http(f"{daemon.admin}/debug/pods").json()}
        assert kernel_cookies == pods
        assert {e["address"] for e in maps["zt_local"]} == {p.ip for p in mesh.plan.pods_on(node)}
        assert "zt_sk_orig" in maps and "out_redirected" in view["counters"]
        assert len(view["attachPoints"]["podLinks"]) == len(mesh.plan.pods_on(node))


def test_dashboard_in_a_real_browser(mesh: Mesh, tmp_path: Path) -> None:
    """``/`` rendered by headless Chromium while a connection is open: the page shows the
    node's pods and that connection, and its screenshot is a real, non-blank page."""
    require(browser.chromium() is not None, "chromium is not installed (tools/setup.sh)")
    client, server = mesh.pod(CLIENT), mesh.pod(SERVER)
    daemon = daemon_of(mesh, CLIENT)
    stream = start_stream(mesh, CLIENT, ON_NODE_1.vip, ECHO_PORT)
    try:
        wait_until(lambda: bool(listed(mesh, CLIENT)["outbound"]), "the connection to be listed")
        dom = browser.dump_dom(daemon.admin + "/")
        shot = browser.screenshot(
            daemon.admin + "/", tmp_path / f"dashboard-{mesh.options.redirect}.png"
        )
    finally:
        finish_stream(stream)
    for pod in mesh.plan.pods_on(client.node):
        assert f"{pod.namespace}/{pod.name}" in dom
    assert f"{server.ip}:15008" in dom and f"{ON_NODE_1.vip}:{ECHO_PORT}" in dom
    assert 'href="/debug/pprof/profile"' in dom and 'href="/config_dump"' in dom
    summary = browser.png_summary(shot)
    assert (summary.width, summary.height) == (1280, 900)
    assert summary.colours > 10  # text, table headers, state colours: not a blank page


# ----------------------------------------------------------------------------- real istioctl

ISTIOCTL_TABLES = ("connections", "workload", "service", "policy", "certificate")
UNUSED_PORT_DENY = {
    "name": "deny-unused-port",
    "namespace": "default",
    "scope": "Namespace",
    "action": "Deny",
    "rules": [[[{"destinationPorts": [9999]}]]],
}


def lab_istioctl() -> Path:
    """istioctl as the Istio lab builds it (tools/lab/build.sh, from istio's own source)."""
    try:
        istioctl: Path = find_binaries().istioctl
    except LabBinariesMissing as e:
        require(False, str(e))
    return istioctl


def istioctl_table(istioctl: Path, table: str, dump: Path, kubeconfig: Path) -> list[list[str]]:
    proc = subprocess.run(
        [str(istioctl), f"--kubeconfig={kubeconfig}", "ztunnel-config", table, "--file", str(dump)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, (table, proc.stdout, proc.stderr)
    return [line.split() for line in proc.stdout.splitlines() if line.strip()]


def test_real_istioctl_prints_every_table_from_our_dump(mesh: Mesh, tmp_path: Path) -> None:
    istioctl = lab_istioctl()
    kubeconfig = tmp_path / "kubeconfig"  # --file needs no cluster; an empty config is enough
    kubeconfig.write_text("apiVersion: v1\nkind: Config\nclusters: []\ncontexts: []\nusers: []\n")
    client, server = mesh.pod(CLIENT), mesh.pod(SERVER)
    mesh.write_config([UNUSED_PORT_DENY])
    wait_until(
        lambda: all(len(d.config_dump()["policies"]) == 1 for d in mesh.daemons.values()),
        "every daemon to load the policy",
    )
    stream = start_stream(mesh, CLIENT, ON_NODE_1.vip, ECHO_PORT)
    try:
        wait_until(lambda: bool(listed(mesh, SERVER)["inbound"]), "both sides to list it")
        dumps = {}
        for name in (CLIENT, SERVER):
            path = tmp_path / f"{name}.json"
            path.write_text(json.dumps(daemon_of(mesh, name).config_dump()))
            dumps[name] = path
    finally:
        finish_stream(stream)
        mesh.write_config()

    out_rows = istioctl_table(istioctl, "connections", dumps[CLIENT], kubeconfig)
    assert out_rows[0] == [
        "WORKLOAD",
        "DIRECTION",
        "LOCAL",
        "REMOTE",
        "REMOTE",
        "TARGET",
        "PROTOCOL",
    ]
    (row,) = [r for r in out_rows[1:] if r[1] == "Outbound"]
    assert row[0] == f"{client.name}.{client.namespace}"
    assert row[2].startswith(f"{client.name}.{client.namespace}:")  # our address, named
    assert row[3] == f"{server.name}.{server.namespace}:15008"
    assert row[4] == f"{ON_NODE_1.hostname}:{ECHO_PORT}"
    assert row[5] == "HBONE"
    in_rows = istioctl_table(istioctl, "connections", dumps[SERVER], kubeconfig)
    (row,) = [r for r in in_rows[1:] if r[1] == "Inbound"]
    assert row[0] == f"{server.name}.{server.namespace}"
    assert row[2] == f"{server.name}.{server.namespace}:{ECHO_PORT}"
    assert row[3].startswith(f"{client.name}.{client.namespace}:")
    assert row[4:] == [ON_NODE_1.hostname, "HBONE"]

    workloads = istioctl_table(istioctl, "workload", dumps[CLIENT], kubeconfig)
    names = {r[1] for r in workloads[1:]}
    assert {p.name for p in mesh.plan.pods} <= names
    services = istioctl_table(istioctl, "service", dumps[CLIENT], kubeconfig)
    assert any(ON_NODE_1.name in r and ON_NODE_1.vip in r for r in services[1:])
    policies = istioctl_table(istioctl, "policy", dumps[CLIENT], kubeconfig)
    assert [r[:2] for r in policies[1:]] == [["default", "deny-unused-port"]]
    certificates = istioctl_table(istioctl, "certificate", dumps[CLIENT], kubeconfig)
    for pod in mesh.plan.pods_on(client.node):
        assert any(
            f"spiffe://cluster.local/ns/default/sa/{pod.service_account}" in r
            for r in certificates[1:]
        )
