"""A node's daemon going away and coming back, with its pods' traffic watched from outside.

- a restarted daemon re-enrols every pod and serves again (eBPF: it re-adopts the pinned maps
  and links, the same kernel objects);
- eBPF fails closed: with the daemon down, a pod's connections to mesh destinations are refused
  and nothing reaches the destination in plaintext, while non-mesh destinations still work;
- a graceful handover to a second daemon loses no byte of a running transfer, and new
  connections go to the new daemon.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
from typing import Any

import pytest

from tests.netns.e2e.support import (
    MODES,
    PROXY_PORTS,
    MeshMaker,
    NetnsServer,
    accepted_on,
    any_address,
    bpf_dump,
    captured_cookies,
    exchange,
    finish_stream,
    netns_cookies,
    node_address,
    proxy_listeners,
    start_stream,
    workload_state,
)
from tools.testbed.mesh import ExtraService, Mesh
from ztunnel_py.testing.cni_agent import AgentPod
from ztunnel_py.testing.daemon import Daemon
from ztunnel_py.testing.poll import HANG_GUARD_S, wait_until

pytestmark = [pytest.mark.root]

ON_NODE_1 = ExtraService("only-n1", "10.96.0.101", ("pod-1-1",))
ON_NODE_0 = ExtraService("only-n0", "10.96.0.100", ("pod-0-1",))
RECORDER_PORT = 7777  # a port no app serves: only the test's recorder listens on it
OUTSIDE_PORT = 7778


def assert_echo_ok(mesh: Mesh, pod: str, host: str, port: int, size: int = 200_000) -> None:
    echoed = mesh.client(pod, "echo", host, port, "--bytes", str(size))
    assert echoed["result"] == "ok", echoed
    assert echoed["received"] == size
    assert echoed["sha256"] == echoed["expected_sha256"]


def assert_node_serves(mesh: Mesh, daemon: Daemon) -> None:
    """Every pod of node-0 is Up under ``daemon`` and traffic crosses nodes both ways."""
    assert workload_state(daemon) == {p.uid: "Up" for p in mesh.plan.pods_on("node-0")}
    for pod in mesh.plan.pods_on("node-0"):
        assert proxy_listeners(mesh, pod.name) == {p: {daemon.proc.pid} for p in PROXY_PORTS}
    for vip in ON_NODE_1.vips(mesh.options.ip_family):
        assert_echo_ok(mesh, "pod-0-0", vip, 9000)  # out of node-0
    for vip in ON_NODE_0.vips(mesh.options.ip_family):
        assert_echo_ok(mesh, "pod-1-0", vip, 9000)  # into node-0


def link_ids(bpf: dict[str, Any]) -> dict[str, int]:
    points = bpf["attachPoints"]
    ids = {link["program"]: link["linkId"] for link in points["cgroupLinks"]}
    ids |= {link["pod"]: link["linkId"] for link in points["podLinks"]}
    return ids


# ----------------------------------------------------------------------------- restart


@pytest.mark.parametrize("ip_family", ["ipv4", "dual"])  # dual: both families at once
@pytest.mark.parametrize("redirect", MODES)
def test_restarted_daemon_re_enrols_every_pod_and_serves(
    make_mesh: MeshMaker, redirect: str, ip_family: str
) -> None:
    mesh = make_mesh("dr", redirect, ip_family=ip_family, services=(ON_NODE_1, ON_NODE_0))
    old = mesh.daemons["node-0"]
    before = bpf_dump(old) if redirect == "ebpf" else {}

    assert mesh.stop_daemon("node-0") == 0  # SIGTERM: drained and exited cleanly
    for pod in mesh.plan.pods_on("node-0"):
        assert proxy_listeners(mesh, pod.name) == {}
    down = mesh.client("pod-0-0", "echo", mesh.vip(ON_NODE_1), 9000)
    assert down["result"] == "refused", down  # still redirected, to nobody

    new = mesh.start_daemon("node-0")
    assert new.proc.pid != old.proc.pid
    assert_node_serves(mesh, new)
    if redirect == "ebpf":
        after = bpf_dump(new)
        assert not before["adopted"]
        assert after["adopted"]
        # The very same kernel links (programs swapped in place) and the same enrolled pods.
        assert link_ids(after) == link_ids(before)
        assert len(after["attachPoints"]["podLinks"]) == 2
        assert after["maps"]["zt_pods"] == before["maps"]["zt_pods"]


@pytest.mark.parametrize("redirect", MODES)
def test_restart_forgets_a_pod_deleted_while_the_daemon_was_down(
    make_mesh: MeshMaker, redirect: str
) -> None:
    mesh = make_mesh("dd", redirect, services=(ON_NODE_1,))
    kept, deleted = mesh.pod("pod-0-0"), mesh.pod("pod-0-1")
    agent, loop = mesh.agents["node-0"], mesh.loop
    assert loop is not None
    cookies = netns_cookies(mesh.daemons["node-0"]) if redirect == "ebpf" else {}

    mesh.stop_daemon("node-0", signum=signal.SIGKILL)
    loop.run(agent.wait_disconnected(), timeout=HANG_GUARD_S)
    assert loop.run(agent.del_pod(deleted.uid)) is None  # nobody to tell: only the cache
    new = mesh.start_daemon("node-0")

    assert workload_state(new) == {kept.uid: "Up"}
    assert proxy_listeners(mesh, deleted.name) == {}
    assert_echo_ok(mesh, kept.name, ON_NODE_1.vip, 9000)
    if redirect == "ebpf":
        # Its pinned capture went with the snapshot: not captured, so not refused either.
        assert captured_cookies(new) == {cookies[kept.ip]}
        assert len(bpf_dump(new)["attachPoints"]["podLinks"]) == 1
        direct = mesh.client(deleted.name, "echo", mesh.pod("pod-1-1").ip, 9000)
        assert direct["result"] == "ok", direct


# ----------------------------------------------------------------------------- fail closed


@pytest.mark.bpf
@pytest.mark.parametrize(
    ("signum", "ip_family"),
    [
        (signal.SIGKILL, "ipv4"),
        (signal.SIGTERM, "ipv4"),
        (signal.SIGKILL, "ipv6"),
        (signal.SIGKILL, "dual"),
    ],
    ids=["kill", "term", "kill-ipv6", "kill-dual"],
)
def test_ebpf_fails_closed_while_the_daemon_is_down(
    make_mesh: MeshMaker, signum: int, ip_family: str
) -> None:
    mesh = make_mesh("fc", "ebpf", ip_family=ip_family, services=(ON_NODE_1,))
    client, target = mesh.pod("pod-0-0"), mesh.pod("pod-1-1")
    node = mesh.plan.node("node-0")
    node_netns = f"/run/netns/{node.netns}"
    node_ip = node_address(mesh, node.name, client.ip)
    vip = mesh.vip(ON_NODE_1)
    with (
        NetnsServer(target.netns_path, any_address(target.ip), RECORDER_PORT) as recorder,
        NetnsServer(node_netns, node_ip, OUTSIDE_PORT, echo=True),
    ):
        # Serving: the recorder in the destination pod sees the mesh connection arrive, and
        # plaintext from outside the mesh into the pod goes through the proxy.
        sent = mesh.client(client.name, "echo", target.ip, RECORDER_PORT, "--bytes", "1000")
        assert sent["result"] == "ok", sent
        wait_until(lambda: [n for _, n in recorder.seen()] == [1000], "the recorder to see it")
        assert exchange(node_netns, client.ip, 9000, b"hello") == ("ok", b"hello")
        recorder.clear()

        code = mesh.stop_daemon("node-0", signum=signum)
        assert code == (-signal.SIGKILL if signum == signal.SIGKILL else 0)

        for host, port in ((vip, 9000), (target.ip, RECORDER_PORT)):
            refused = mesh.client(client.name, "echo", host, port, "--bytes", "1000")
            assert refused["result"] == "refused", refused
        assert exchange(node_netns, client.ip, 9000, b"hello") == ("refused", b"")
        # Not a mesh destination: never captured, so it works with the daemon down.
        assert_echo_ok(mesh, client.name, node_ip, OUTSIDE_PORT)
        assert recorder.seen() == []  # not a byte reached the destination in plaintext

        new = mesh.start_daemon("node-0")
        assert bpf_dump(new)["adopted"]
        sent = mesh.client(client.name, "echo", target.ip, RECORDER_PORT, "--bytes", "1000")
        assert sent["result"] == "ok", sent
        wait_until(lambda: [n for _, n in recorder.seen()] == [1000], "the recorder to see it")
        assert_echo_ok(mesh, client.name, vip, 9000)
        assert exchange(node_netns, client.ip, 9000, b"hello") == ("ok", b"hello")


# ----------------------------------------------------------------------------- replay


@pytest.mark.bpf
@pytest.mark.parametrize("how", ["handover", "restart"])
def test_pods_not_yet_replayed_to_a_new_daemon_stay_captured(
    make_mesh: MeshMaker, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    """A new daemon adopts the pinned maps and then hears of the pods one by one: enrolling
    the first must not un-capture the others (their traffic would leave in plaintext)."""
    mesh = make_mesh("rp", "ebpf", services=(ON_NODE_1, ON_NODE_0))
    first, later = mesh.pod("pod-0-0"), mesh.pod("pod-0-1")
    old = mesh.daemons["node-0"]
    cookies = set(netns_cookies(old).values())
    agent, loop = mesh.agents["node-0"], mesh.loop
    assert loop is not None
    assert list(agent.pods) == [first.uid, later.uid]  # the replay order
    gate: asyncio.Event = loop.call(asyncio.Event)  # lives on the agent's loop
    replay = agent._request_add

    async def hold_back_later(conn: Any, pod: AgentPod) -> str:
        if conn.number > 1 and pod.uid == later.uid:
            await gate.wait()
        return await replay(conn, pod)

    monkeypatch.setattr(agent, "_request_add", hold_back_later)
    if how == "restart":
        mesh.stop_daemon("node-0", signum=signal.SIGKILL)
    try:
        new = mesh.start_daemon("node-0", wait="listening")
        wait_until(lambda: workload_state(new) == {first.uid: "Up"}, "the first pod's replay")
        assert captured_cookies(new) == cookies
        direct = mesh.client(later.name, "echo", mesh.pod("pod-1-1").ip, 9000)
        if how == "handover":
            # The old daemon still serves the later pod, through the kernel's capture.
            assert direct["result"] == "ok", direct
            assert_echo_ok(mesh, later.name, ON_NODE_1.vip, 9000)
        else:
            assert direct["result"] == "refused", direct  # fails closed, never plaintext
    finally:
        loop.call(gate.set)
    new.wait_ready()
    if how == "handover":
        assert mesh.stop_daemon("node-0", daemon=old) == 0
    assert captured_cookies(new) == cookies
    assert_node_serves(mesh, new)


# ----------------------------------------------------------------------------- handover


@pytest.mark.parametrize("redirect", MODES)
def test_graceful_handover_loses_no_bytes_and_moves_new_connections(
    make_mesh: MeshMaker, redirect: str
) -> None:
    mesh = make_mesh(
        "ho",
        redirect,
        services=(ON_NODE_1, ON_NODE_0),
        env={"CONNECTION_TERMINATION_DEADLINE": "300s"},  # the drain must never cut the stream
    )
    pod = mesh.pod("pod-0-0")
    node_netns = f"/run/netns/{mesh.plan.node('node-0').netns}"
    old = mesh.daemons["node-0"]
    cookies = netns_cookies(old) if redirect == "ebpf" else {}
    streams: list[subprocess.Popen[str]] = []
    try:
        streams.append(start_stream(mesh, pod.name, ON_NODE_1.vip, 9000))
        wait_until(
            lambda: accepted_on(mesh, pod.name, 15001) == {old.proc.pid},
            "the old daemon to accept the first stream",
        )

        new = mesh.start_daemon("node-0")  # same agent socket; binds beside the old one
        both = {old.proc.pid, new.proc.pid}
        assert proxy_listeners(mesh, pod.name) == {p: both for p in PROXY_PORTS}

        old.signal(signal.SIGTERM)
        wait_until(
            lambda: proxy_listeners(mesh, pod.name) == {p: {new.proc.pid} for p in PROXY_PORTS},
            "the old daemon to close its listeners",
        )
        # A new connection lands on the new daemon; the running one stays with the old.
        streams.append(start_stream(mesh, pod.name, ON_NODE_1.vip, 9000))
        wait_until(
            lambda: accepted_on(mesh, pod.name, 15001) == both,
            "the new daemon to accept the second stream",
        )
        assert old.proc.poll() is None  # still draining the first stream

        results = [finish_stream(proc) for proc in streams]
        for result in results:
            assert result["result"] == "ok", result
            assert result["sent"] == result["received"] > 0
            assert result["sha256"] == result["expected_sha256"]
        assert mesh.stop_daemon("node-0", daemon=old, signum=None) == 0  # drained, not cut

        # The old daemon is gone; the new one serves every pod, and the kernel still sends
        # the pods' connections to it (eBPF: the old daemon left the pods enrolled).
        assert_node_serves(mesh, new)
        assert_echo_ok(mesh, "pod-0-1", ON_NODE_1.vip, 9000)
        if redirect == "ebpf":
            assert captured_cookies(new) == set(cookies.values())
            assert len(bpf_dump(new)["attachPoints"]["podLinks"]) == 2
            # Inbound plaintext capture points at the new daemon's :15006.
            assert exchange(node_netns, pod.ip, 9000, b"inbound") == ("ok", b"inbound")
    finally:
        for proc in streams:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
