"""The kernel splice in a real daemon: two pods of one node, iptables redirection (so a plain
socket in the client pod's netns is captured), the echo app of the testbed.

With the splice on (the default), the connection's bytes are carried by the kernel: the
daemon's ``/debug/redirect`` counts them under ``kernelSplice`` and its Python copy counter
stays at zero, and the Istio byte metrics of both sides still add up. With
``ZTUNNEL_PY_KERNEL_SPLICE=false`` the same traffic is copied by the proxy, and the daemon
says so at start and in ``/debug``.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.netns.e2e.support import MeshMaker, Scrape, exchange
from tools.testbed.mesh import Mesh
from tools.testbed.plan import ECHO_PORT
from ztunnel_py.testing.daemon import http
from ztunnel_py.testing.poll import wait_until

pytestmark = [pytest.mark.root, pytest.mark.bpf]

CLIENT, SERVER = "pod-0-0", "pod-0-1"
PAYLOAD = bytes(range(256)) * 4096  # 1 MiB


def kernel_splice(mesh: Mesh) -> dict[str, Any]:
    daemon = mesh.daemons["node-0"]
    view: dict[str, Any] = http(f"{daemon.admin}/debug/redirect").json()["kernelSplice"]
    return view


def echo_once(mesh: Mesh) -> None:
    client = mesh.pod(CLIENT)
    assert exchange(client.netns_path, mesh.pod(SERVER).ip, ECHO_PORT, PAYLOAD) == ("ok", PAYLOAD)


def request_bytes(mesh: Mesh) -> float:
    scrape = Scrape(mesh.daemons["node-0"])
    return scrape.total("istio_tcp_received_bytes_total", reporter="destination")


def test_same_node_bytes_go_through_the_kernel(make_mesh: MeshMaker) -> None:
    mesh = make_mesh("ks", "iptables", nodes=1)
    assert "kernel splice on" in mesh.daemons["node-0"].log()
    assert kernel_splice(mesh)["status"] == "on"
    echo_once(mesh)
    wait_until(lambda: kernel_splice(mesh)["connections_live"] == 0, "the connection closed")
    view = kernel_splice(mesh)
    assert view["connections_spliced"] == 1
    assert view["kernel_bytes"] + view["proxy_copied_bytes"] == 2 * len(PAYLOAD)
    # The client sends at once, so at most one read may have happened before the splice.
    assert view["proxy_copied_bytes"] <= 256 * 1024
    assert view["program_events"]["redirected"] > 0
    wait_until(lambda: request_bytes(mesh) == len(PAYLOAD), "the destination's request bytes")


def test_turned_off_the_proxy_copies_and_says_why(make_mesh: MeshMaker) -> None:
    mesh = make_mesh("kso", "iptables", nodes=1, env={"ZTUNNEL_PY_KERNEL_SPLICE": "false"})
    assert "kernel splice off (ZTUNNEL_PY_KERNEL_SPLICE=false)" in mesh.daemons["node-0"].log()
    assert kernel_splice(mesh)["status"] == "off: ZTUNNEL_PY_KERNEL_SPLICE=false"
    echo_once(mesh)
    assert kernel_splice(mesh)["connections_spliced"] == 0
    wait_until(lambda: request_bytes(mesh) == len(PAYLOAD), "the destination's request bytes")
