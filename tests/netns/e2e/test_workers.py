"""Multi-worker mode (``ZTUNNEL_WORKER_THREADS=2``) with real daemons, both redirect modes.

Connections come from outside the mesh (the node's own netns) to pod-0-0's echo app, so each
one is accepted by whichever worker takes it from the pod's shared :15006 queue (reached by
iptables' REDIRECT or eBPF's sk_lookup); ``ss -p`` inside the pod says which worker holds it.

- connections are spread over both workers and every one is served; the metrics port sums
  the workers' series under ztunnel's names;
- HBONE between two nodes' workers (certificates come from each node's control plane);
- SIGTERM to a worker: it stops accepting, its live connections keep working until they
  end, new ones go to the other worker and its replacement, then it exits;
- SIGKILL to a worker: the other worker's connections survive, a replacement serves;
- a policy that denies the client closes its live connections in every worker.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.netns.e2e.support import (
    MODES,
    Scrape,
    _socket_in,
    access_records,
    apply_config,
    log_mark,
    mesh_tag,
)
from tools.testbed import cgroup2_mount
from tools.testbed.mesh import Mesh, MeshOptions
from ztunnel_py.testing.daemon import Daemon, http
from ztunnel_py.testing.poll import HANG_GUARD_S, wait_until
from ztunnel_py.testing.privileged import require

pytestmark = [pytest.mark.root]

POD = "pod-0-0"
NODE = "node-0"
ECHO = 9000
INBOUND_PLAINTEXT = 15006
MAX_TRIES = 64  # connections opened before giving up on seeing both workers take some
OPENED = "istio_tcp_connections_opened_total"
CLOSED = "istio_tcp_connections_closed_total"
RECEIVED = "istio_tcp_received_bytes_total"


@pytest.fixture(scope="module", params=MODES)
def mesh(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Mesh]:
    require(cgroup2_mount() is not None, "a cgroup v2 mount (testbed pods live in cgroups)")
    redirect: str = request.param
    options = MeshOptions(
        tag=mesh_tag("wk", redirect),
        redirect=redirect,
        env={
            "ZTUNNEL_WORKER_THREADS": "2",
            "CONNECTION_TERMINATION_DEADLINE": "60s",
            "LOG_FORMAT": "json",
        },
    )
    shared = Mesh(options, Path(tmp_path_factory.mktemp(options.tag)))
    try:
        shared.up()
        yield shared
    finally:
        shared.down()


def workers(daemon: Daemon) -> dict[int, dict[str, Any]]:
    """Serving workers by pid, from ``/config_dump``."""
    table = daemon.config_dump()["workers"]["workers"]
    return {w["pid"]: w for w in table if w["state"] == "serving"}


def two_serving(daemon: Daemon) -> set[int]:
    wait_until(lambda: len(workers(daemon)) == 2, "two serving workers")
    return set(workers(daemon))


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return not Path(f"/proc/{pid}/stat").read_text().split(") ")[1].startswith("Z")


def parent(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().split(") ")[1].split()[1])


def owners(mesh: Mesh) -> dict[int, set[int]]:
    """Client port -> the daemon's worker pids holding the proxy's accepted end in pod-0-0
    (local port 15006 after iptables' REDIRECT, the app's port after eBPF's sk_lookup)."""
    daemon_pid = mesh.daemons[NODE].proc.pid
    out = subprocess.run(
        [
            "nsenter",
            f"--net={mesh.pod(POD).netns_path}",
            "--",
            "ss",
            "-Hntp",
            "state",
            "established",
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=HANG_GUARD_S,
    ).stdout
    found: dict[int, set[int]] = {}
    for line in out.splitlines():
        addrs = [f for f in line.split() if ":" in f and not f.startswith("users:")]
        if len(addrs) >= 2 and addrs[0].rsplit(":", 1)[1] in {str(INBOUND_PLAINTEXT), str(ECHO)}:
            pids = {int(p) for p in re.findall(r"pid=(\d+)", line)}
            workers = {p for p in pids if alive(p) and parent(p) == daemon_pid}
            if workers:
                found.setdefault(int(addrs[1].rsplit(":", 1)[1]), set()).update(workers)
    return found


class Clients:
    """Echo connections from the node's netns to pod-0-0, each checked by a round trip."""

    def __init__(self, mesh: Mesh) -> None:
        self.mesh = mesh
        self.outside = f"/run/netns/{mesh.plan.node(NODE).netns}"
        self.socks: list[socket.socket] = []

    def open(self) -> socket.socket:
        sock = _socket_in(self.outside)
        sock.settimeout(HANG_GUARD_S)
        sock.connect((self.mesh.pod(POD).ip, ECHO))
        self.socks.append(sock)
        assert echoes(sock, b"hello")
        return sock

    def holder(self, sock: socket.socket) -> int:
        """The worker pid holding the proxy's end of ``sock``."""
        port = sock.getsockname()[1]
        found: set[int] = set()

        def held() -> bool:
            found.clear()
            found.update(owners(self.mesh).get(port, set()))
            return len(found) == 1

        wait_until(held, f"one process to hold the connection from port {port}")
        return found.pop()

    def spread(self, pids: set[int]) -> dict[int, list[socket.socket]]:
        """Open connections until every worker in ``pids`` holds one: worker -> its sockets."""
        by_worker: dict[int, list[socket.socket]] = {}
        for _ in range(MAX_TRIES):
            sock = self.open()
            by_worker.setdefault(self.holder(sock), []).append(sock)
            if pids <= by_worker.keys():
                return by_worker
        raise AssertionError(f"{MAX_TRIES} connections all went to {sorted(by_worker)}")

    def close(self) -> None:
        for sock in self.socks:
            sock.close()
        self.socks.clear()


def echoes(sock: socket.socket, payload: bytes) -> bool:
    sock.sendall(payload)
    got = b""
    while len(got) < len(payload):
        chunk = sock.recv(65536)
        if not chunk:
            return False
        got += chunk
    return got == payload


def closed_by_peer(sock: socket.socket) -> bool:
    try:
        sock.sendall(b"x")
        return sock.recv(64) == b""
    except (ConnectionResetError, BrokenPipeError):
        return True


@pytest.fixture
def clients(mesh: Mesh) -> Iterator[Clients]:
    made = Clients(mesh)
    try:
        yield made
    finally:
        made.close()


def test_connections_are_spread_over_workers_served_and_counted_once(
    mesh: Mesh, clients: Clients
) -> None:
    daemon = mesh.daemons[NODE]
    pids = two_serving(daemon)
    assert daemon.config_dump()["workers"]["count"] == 2
    before = Scrape(daemon)
    by_worker = clients.spread(pids)
    socks = [s for held in by_worker.values() for s in held]
    for sock in socks:  # every connection, whichever worker holds it, still echoes
        assert echoes(sock, b"0123456789")
    clients.close()
    labels = {"reporter": "destination", "destination_workload": mesh.pod(POD).app}

    def counted() -> bool:
        return Scrape(daemon).total(CLOSED, **labels) - before.total(CLOSED, **labels) == len(socks)

    wait_until(counted, "every closed connection to be counted")
    after = Scrape(daemon)
    assert after.total(OPENED, **labels) - before.total(OPENED, **labels) == len(socks)
    # "hello" and "0123456789" from each client: one series per family, summed over workers.
    assert after.total(RECEIVED, **labels) - before.total(RECEIVED, **labels) == 15 * len(socks)
    assert set(workers(daemon)) == pids  # nobody was replaced


def test_sigterm_drains_one_worker_while_the_others_take_new_connections(
    mesh: Mesh, clients: Clients
) -> None:
    daemon = mesh.daemons[NODE]
    pids = two_serving(daemon)
    by_worker = clients.spread(pids)
    victim = next(iter(pids))
    os.kill(victim, signal.SIGTERM)
    # A replacement serves beside the draining worker; the drained one holds no listener.
    wait_until(lambda: victim not in workers(daemon) and len(workers(daemon)) == 2, "a replacement")
    fresh = [clients.open() for _ in range(8)]
    assert all(clients.holder(sock) != victim for sock in fresh)
    assert alive(victim)  # still draining: its connections are live
    for sock in by_worker[victim]:
        assert echoes(sock, b"still here")
    for sock in by_worker[victim]:
        sock.close()
    wait_until(lambda: not alive(victim), "the drained worker to exit once its connections ended")
    for held in by_worker.values():
        for sock in held:
            if sock.fileno() >= 0:
                assert echoes(sock, b"others unharmed")


def test_a_killed_worker_is_replaced_and_the_others_connections_survive(
    mesh: Mesh, clients: Clients
) -> None:
    daemon = mesh.daemons[NODE]
    pids = two_serving(daemon)
    by_worker = clients.spread(pids)
    victim, survivor = sorted(pids)
    restarts = daemon.config_dump()["workers"]["restarts"]
    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: victim not in workers(daemon) and len(workers(daemon)) == 2, "a replacement")
    assert daemon.config_dump()["workers"]["restarts"] == restarts + 1
    for sock in by_worker[survivor]:
        assert echoes(sock, b"survived")
    for sock in by_worker[victim]:
        assert closed_by_peer(sock)
    (replacement,) = set(workers(daemon)) - pids
    clients.spread({replacement, survivor})  # the replacement takes connections too
    assert daemon.proc.poll() is None


def test_mesh_traffic_between_nodes_goes_through_workers_on_both_sides(mesh: Mesh) -> None:
    """HBONE both ways: each side's worker gets its pod's certificate from its control plane."""
    for node in ("node-0", "node-1"):
        two_serving(mesh.daemons[node])
    for _ in range(4):
        result = mesh.client("pod-0-0", "echo", mesh.pod("pod-1-1").ip, ECHO, "--bytes", "100000")
        assert result["result"] == "ok", result
        assert result["sha256"] == result["expected_sha256"]


def deny_outside(mesh: Mesh) -> None:
    """A DENY of the node's address (where the test clients connect from) on pod-0-0."""
    outside_ip = mesh.plan.node(NODE).gateway
    block = {
        "name": "wk-block",
        "namespace": "default",
        "scope": "WorkloadSelector",
        "action": "Deny",
        "rules": [[[{"sourceIps": [f"{outside_ip}/32"]}]]],  # rule -> clause -> match
    }
    apply_config(mesh, [block], selected={POD: ["default/wk-block"]})


def test_a_policy_change_closes_denied_connections_in_every_worker(
    mesh: Mesh, clients: Clients
) -> None:
    daemon = mesh.daemons[NODE]
    pids = two_serving(daemon)
    by_worker = clients.spread(pids)
    deny_outside(mesh)
    try:
        for pid, held in by_worker.items():
            for sock in held:
                assert closed_by_peer(sock), f"worker {pid} kept a denied connection"
    finally:
        apply_config(mesh)
    with contextlib.closing(clients.open()) as sock:  # allowed again
        assert echoes(sock, b"back")


def test_a_policy_change_reaches_a_draining_worker(mesh: Mesh, clients: Clients) -> None:
    daemon = mesh.daemons[NODE]
    pids = two_serving(daemon)
    by_worker = clients.spread(pids)
    victim = next(iter(pids))
    os.kill(victim, signal.SIGTERM)
    wait_until(lambda: victim not in workers(daemon) and len(workers(daemon)) == 2, "a replacement")
    assert alive(victim)  # draining (60 s deadline) with its connections open
    deny_outside(mesh)
    try:
        for sock in by_worker[victim]:
            assert closed_by_peer(sock), "the draining worker kept a denied connection"
        wait_until(lambda: not alive(victim), "the drained worker to exit, nothing left to serve")
    finally:
        apply_config(mesh)


def test_log_levels_set_on_the_admin_port_reach_every_worker(mesh: Mesh, clients: Clients) -> None:
    daemon = mesh.daemons[NODE]
    pids = two_serving(daemon)
    target = {"dst.addr": f"{mesh.pod(POD).ip}:{ECHO}"}
    labels = {"reporter": "destination", "destination_workload": mesh.pod(POD).app}

    def closed_all(before: Scrape, count: int) -> None:
        wait_until(
            lambda: (
                Scrape(daemon).total(CLOSED, **labels) - before.total(CLOSED, **labels) == count
            ),
            "the connections to be counted closed",
        )

    assert http(f"{daemon.admin}/logging?level=error", method="POST").status == 200
    try:
        quiet_mark, before = log_mark(daemon), Scrape(daemon)
        quiet = sum(len(held) for held in clients.spread(pids).values())
        clients.close()
        closed_all(before, quiet)  # done (and not logged) before the levels change back
    finally:
        assert http(f"{daemon.admin}/logging?reset", method="POST").status == 200
    loud_mark, before = log_mark(daemon), Scrape(daemon)
    assert access_records(daemon, quiet_mark, **target) == []  # INFO was off in every worker
    loud = sum(len(held) for held in clients.spread(pids).values())
    clients.close()
    closed_all(before, loud)
    wait_until(
        lambda: len(access_records(daemon, loud_mark, **target)) == loud,
        "an access-log line per connection, from both workers",
    )


def test_workers_never_outlive_a_killed_control_plane(mesh: Mesh) -> None:
    """Last in the module: it kills the node's daemon. Without their control plane no policy
    change could reach the workers, so they go with it."""
    daemon = mesh.daemons[NODE]
    pids = two_serving(daemon)
    daemon.proc.kill()
    daemon.proc.wait(timeout=HANG_GUARD_S)
    wait_until(lambda: not any(alive(pid) for pid in pids), "the workers to die with it")
