"""A host outside a pod that connects to the pod's :15001 from the source port of one of the
pod's live redirected connections (eBPF mode) must be refused and never tunnelled: the
original-destination entry belongs to the pod's own socket, not to whoever shows its port."""

from __future__ import annotations

import os
import socket
import subprocess

import pytest

from tests.netns.e2e.support import (
    MeshMaker,
    NetnsServer,
    finish_stream,
    log_mark,
    start_stream,
)
from tools.testbed.mesh import ExtraService
from ztunnel_py.netns import run_in_netns
from ztunnel_py.testing.poll import wait_until

pytestmark = [pytest.mark.root, pytest.mark.bpf]

ON_NODE_1 = ExtraService("only-n1", "10.96.0.101", ("pod-1-1",))
RECORDER_PORT = 7779  # a port no app serves: only the test's recorder listens on it


def redirected_source_ports(netns_path: str) -> set[int]:
    """Source ports of the pod's connections that connect4 sent to its loopback :15001."""
    out = subprocess.run(
        ["nsenter", f"--net={netns_path}", "--", "ss", "-Htn", "state", "established",
         "dst", "127.0.0.1:15001"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    return {int(line.split()[-2].rsplit(":", 1)[1]) for line in out.splitlines() if line.strip()}


def connect_from(netns_path: str, source: tuple[str, int], target: tuple[str, int]) -> str:
    """Connect from ``source`` (bound) in the netns, send, and say what came back."""
    fd = os.open(netns_path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        sock = run_in_netns(fd, lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM))
    finally:
        os.close(fd)
    with sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(source)
        sock.settimeout(10)
        try:
            sock.connect(target)
            sock.sendall(b"hijack")
            data = sock.recv(64)
        except ConnectionRefusedError:
            return "refused"
        except (ConnectionResetError, BrokenPipeError):
            return "reset"
        return "closed" if not data else f"answered {data!r}"


def test_outsider_reusing_a_live_source_port_is_refused_and_never_tunnelled(
    make_mesh: MeshMaker,
) -> None:
    mesh = make_mesh("op", "ebpf", services=(ON_NODE_1,))
    client, target = mesh.pod("pod-0-0"), mesh.pod("pod-1-1")
    node = mesh.plan.node("node-0")
    daemon = mesh.daemons["node-0"]
    with NetnsServer(target.netns_path, "0.0.0.0", RECORDER_PORT, echo=True) as recorder:
        stream = start_stream(mesh, client.name, target.ip, RECORDER_PORT)  # held open
        try:
            ports = redirected_source_ports(client.netns_path)
            assert len(ports) == 1, ports
            (live_port,) = ports
            mark = log_mark(daemon)

            outcome = connect_from(
                f"/run/netns/{node.netns}", (node.gateway, live_port), (client.ip, 15001)
            )

            assert outcome in ("reset", "closed"), outcome
            wait_until(
                lambda: "not from the pod's own redirected sockets" in daemon.log()[mark:],
                "the daemon to refuse the outsider",
            )
            assert recorder.seen() == [], "the outsider's bytes reached the destination"
        finally:
            result = finish_stream(stream)
        assert result["result"] == "ok", result
        wait_until(lambda: len(recorder.seen()) == 1, "the pod's own stream to finish")
        assert "hijack" not in str(recorder.seen())
