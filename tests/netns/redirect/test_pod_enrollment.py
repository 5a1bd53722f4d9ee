"""Pod enrolment through the fake istio-cni agent: real netns fds, in-pod listeners (root)."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import socket
import tempfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import pytest_asyncio
from prometheus_client import CollectorRegistry

from ztunnel_py.config import WorkloadInfo
from ztunnel_py.redirect.listeners import EnrollmentError, ListenerOptions, PodListeners
from ztunnel_py.redirect.workloads import (
    EnrolledPod,
    PodState,
    WorkloadManager,
    WorkloadManagerMetrics,
)
from ztunnel_py.redirect.zds import ZdsClient
from ztunnel_py.redirect.zds_protocol import Backoff, encode_keep
from ztunnel_py.state.model import Workload
from ztunnel_py.state.store import ProxyState, UpdateBatch
from ztunnel_py.testing.cni_agent import FakeCniAgent
from ztunnel_py.testing.echo_pod import EchoPodProxyFactory
from ztunnel_py.testing.netns import Netns, NetnsPool, sh
from ztunnel_py.testing.poll import wait_until_async

pytestmark = [pytest.mark.root]

PORTS = (15001, 15006, 15008)


def workload(uid: str, name: str, ip: str) -> Workload:
    return Workload(
        uid=uid,
        name=name,
        namespace="default",
        service_account=f"sa-{name}",
        workload_ips=(ipaddress.ip_address(ip),),
    )


def info_of(w: Workload) -> WorkloadInfo:
    return WorkloadInfo(namespace=w.namespace, name=w.name, service_account=w.service_account)


def listening_ports(ns: Netns) -> set[int]:
    out = ns.sh("ss", "-Hltn").stdout
    return {int(line.split()[3].rsplit(":", 1)[1]) for line in out.splitlines() if line.strip()}


def listener_inodes(ns: Netns | None) -> set[int]:
    out = ns.sh("ss", "-Hltne").stdout if ns is not None else sh("ss", "-Hltne").stdout
    return {int(tok[4:]) for tok in out.split() if tok.startswith("ino:")}


def inodes_of(listeners: PodListeners) -> set[int]:
    return {os.fstat(s.fileno()).st_ino for s in listeners.sockets()}


async def connect_in(ns: Netns, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    sock = ns.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    return await asyncio.open_connection(sock=sock)


async def echo(ns: Netns, port: int, payload: bytes, greeting: bytes = b"") -> bytes:
    reader, writer = await connect_in(ns, port)
    try:
        writer.write(payload)
        await writer.drain()
        return await reader.readexactly(len(greeting) + len(payload))
    finally:
        writer.close()


@dataclass
class Daemon:
    """One ztunnel-py's enrolment side: state, manager, ZDS client."""

    state: ProxyState
    manager: WorkloadManager
    factory: EchoPodProxyFactory
    client: ZdsClient
    registry: CollectorRegistry
    ready_changes: list[bool] = field(default_factory=list)
    task: asyncio.Task[None] | None = None

    def metric(self, name: str) -> float | None:
        return self.registry.get_sample_value(name)

    async def stop(self) -> None:
        self.client.close()
        if self.task is not None:
            await self.task
        await self.manager.shutdown(0.0)


@dataclass
class Env:
    pool: NetnsPool
    agent: FakeCniAgent
    daemons: list[Daemon] = field(default_factory=list)

    def pod_netns(self, role: str) -> Netns:
        return self.pool.netns(role)

    def start_daemon(
        self,
        workloads: tuple[Workload, ...] = (),
        *,
        greeting: bytes = b"",
        options: ListenerOptions | None = None,
        retry_interval_s: float = 0.05,
    ) -> Daemon:
        state = ProxyState()
        if workloads:
            state.apply(UpdateBatch(workloads=workloads))
        registry = CollectorRegistry()
        factory = EchoPodProxyFactory(greeting)
        manager = WorkloadManager(
            state,
            factory,
            options=options,
            metrics=WorkloadManagerMetrics(registry),
            retry_interval_s=retry_interval_s,
        )
        ready: list[bool] = []
        client = ZdsClient(
            self.agent.path, manager, backoff=Backoff(0.01, 0.05), on_ready=ready.append
        )
        daemon = Daemon(state, manager, factory, client, registry, ready)
        daemon.task = asyncio.get_running_loop().create_task(client.run())
        self.daemons.append(daemon)
        return daemon


@pytest.fixture
def pool() -> Iterator[NetnsPool]:
    with NetnsPool() as p:
        yield p


@pytest_asyncio.fixture
async def env(pool: NetnsPool) -> AsyncIterator[Env]:
    sock_dir = Path(tempfile.mkdtemp(prefix="zds-"))  # short: unix socket paths are limited
    agent = FakeCniAgent(sock_dir / "ztunnel.sock")
    await agent.start()
    e = Env(pool, agent)
    try:
        yield e
    finally:
        for daemon in e.daemons:
            await daemon.stop()
        await agent.stop()
        with contextlib.suppress(OSError):
            os.rmdir(sock_dir)


def netns_path(ns: Netns) -> str:
    return f"/run/netns/{ns.name}"


# ----------------------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_listeners_are_created_inside_the_pod_netns(env: Env) -> None:
    w = workload("uid-a", "a", "10.1.0.1")
    ns = env.pod_netns("a")
    assert listening_ports(ns).isdisjoint(PORTS)
    daemon = env.start_daemon((w,), greeting=b"A:")
    await env.agent.wait_snapshots(1)
    assert await env.agent.add_pod(w.uid, info_of(w), netns_path(ns)) == ""

    assert set(PORTS) <= listening_ports(ns)
    listeners = daemon.manager.listeners_of(w.uid)
    assert listeners is not None
    ours = inodes_of(listeners)
    assert ours <= listener_inodes(ns)
    assert ours.isdisjoint(listener_inodes(None))  # none of them is in the daemon's own netns
    for sock in listeners.sockets():
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_MARK) == 0x539
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) == 1
        assert sock.family == socket.AF_INET6  # [::], dual stack
        assert sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 0
    for port in PORTS:
        assert await echo(ns, port, b"ping", b"A:") == b"A:ping"

    pod = daemon.factory.started[-1]
    assert pod.uid == w.uid
    assert pod.ips == w.workload_ips
    assert pod.netns_cookie == ns.run(lambda: _cookie_here())
    assert daemon.manager.dump() == {
        w.uid: {
            "info": {"name": "a", "namespace": "default", "serviceAccount": "sa-a"},
            "state": "Up",
        }
    }
    assert daemon.metric("workload_manager_active_proxy_count") == 1
    assert daemon.metric("workload_manager_pending_proxy_count") == 0
    assert daemon.metric("workload_manager_proxies_started_total") == 1


def _cookie_here() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        return int.from_bytes(s.getsockopt(socket.SOL_SOCKET, 71, 8), "little")


@pytest.mark.asyncio
async def test_ipv4_only_listeners_when_ipv6_is_disabled(env: Env) -> None:
    w = workload("uid-v4", "v4", "10.1.0.9")
    ns = env.pod_netns("v4")
    daemon = env.start_daemon((w,), options=ListenerOptions(ipv6=False))
    await env.agent.wait_snapshots(1)
    assert await env.agent.add_pod(w.uid, info_of(w), netns_path(ns)) == ""
    listeners = daemon.manager.listeners_of(w.uid)
    assert listeners is not None
    assert {s.family for s in listeners.sockets()} == {socket.AF_INET}
    assert {s.getsockname()[0] for s in listeners.sockets()} == {"0.0.0.0"}


@pytest.mark.asyncio
async def test_ready_only_after_the_snapshot(env: Env) -> None:
    w = workload("uid-r", "r", "10.1.0.2")
    await env.agent.add_pod(w.uid, info_of(w), netns_path(env.pod_netns("r")))
    seen_ready_at_enroll: list[bool] = []
    daemon = env.start_daemon((w,))
    real_enroll = daemon.manager.enroll

    async def spy(uid: str, info: WorkloadInfo, fd: int) -> None:
        seen_ready_at_enroll.append(daemon.client.ready)
        await real_enroll(uid, info, fd)

    daemon.client.handler = type(
        "Spy", (), {"enroll": staticmethod(spy), "remove": daemon.manager.remove}
    )()
    await env.agent.wait_snapshots(1)
    await wait_until_async(lambda: daemon.client.ready, "client ready")
    assert seen_ready_at_enroll == [False]
    assert daemon.ready_changes == [True]


@pytest.mark.asyncio
async def test_pod_removal_closes_listeners_and_connections(env: Env) -> None:
    w = workload("uid-d", "d", "10.1.0.3")
    ns = env.pod_netns("d")
    daemon = env.start_daemon((w,))
    await env.agent.wait_snapshots(1)
    await env.agent.add_pod(w.uid, info_of(w), netns_path(ns))
    reader, writer = await connect_in(ns, 15001)
    writer.write(b"x")
    assert await reader.readexactly(1) == b"x"

    assert await env.agent.del_pod(w.uid) == ""
    assert listening_ports(ns).isdisjoint(PORTS)
    assert await reader.read() == b""  # the live connection was closed too
    writer.close()
    assert daemon.manager.dump() == {}
    assert daemon.metric("workload_manager_active_proxy_count") == 0
    assert daemon.metric("workload_manager_proxies_stopped_total") == 1


@pytest.mark.asyncio
async def test_pod_waits_for_late_xds_then_starts(env: Env) -> None:
    w = workload("uid-late", "late", "10.1.0.4")
    ns = env.pod_netns("late")
    daemon = env.start_daemon(())  # xDS does not know the pod yet
    await env.agent.wait_snapshots(1)
    assert (
        await env.agent.add_pod(w.uid, info_of(w), netns_path(ns)) == ""
    )  # acked: listeners exist
    assert daemon.manager.pod_state(w.uid) is PodState.PENDING
    assert set(PORTS) <= listening_ports(ns)
    assert daemon.manager.dump()[w.uid]["state"] == "Pending"
    assert daemon.metric("workload_manager_pending_proxy_count") == 1
    assert daemon.factory.started == []

    # A workload with the same name but another service account is not this pod.
    other = Workload(uid="x", name="late", namespace="default", service_account="someone-else")
    daemon.manager.state_changed(daemon.state.apply(UpdateBatch(workloads=(other,))))
    await daemon.manager.retry_pending()
    assert daemon.manager.pod_state(w.uid) is PodState.PENDING

    daemon.manager.state_changed(daemon.state.apply(UpdateBatch(workloads=(w,))))
    await wait_until_async(
        lambda: daemon.manager.pod_state(w.uid) is PodState.UP, "pod up after xDS"
    )
    assert [p.uid for p in daemon.factory.started] == [w.uid]
    assert daemon.factory.started[0].workload == w
    assert await echo(ns, 15008, b"late") == b"late"
    assert daemon.metric("workload_manager_pending_proxy_count") == 0


@pytest.mark.asyncio
async def test_on_demand_mode_asks_for_a_late_workload(env: Env) -> None:
    """With XDS_ON_DEMAND a pending pod asks istiod for its workload instead of only waiting."""
    w = workload("uid-od", "od", "10.1.0.9")
    ns = env.pod_netns("od")
    daemon = env.start_daemon(())
    asked: list[tuple[str, str, str]] = []

    def demand(info: WorkloadInfo) -> None:  # what istiod's answer would do
        asked.append((info.namespace, info.name, info.service_account))
        daemon.manager.state_changed(daemon.state.apply(UpdateBatch(workloads=(w,))))

    daemon.manager.demand_workload = demand
    await env.agent.wait_snapshots(1)
    assert await env.agent.add_pod(w.uid, info_of(w), netns_path(ns)) == ""
    await wait_until_async(
        lambda: daemon.manager.pod_state(w.uid) is PodState.UP, "pod up on demand"
    )
    assert asked == [("default", "od", w.service_account)]


@pytest.mark.asyncio
async def test_failed_start_is_nacked_kept_pending_and_retried(env: Env) -> None:
    w = workload("uid-f", "f", "10.1.0.5")
    ns = env.pod_netns("f")
    daemon = env.start_daemon((w,))
    daemon.factory.fail_next = 1
    await env.agent.wait_snapshots(1)
    error = await env.agent.add_pod(w.uid, info_of(w), netns_path(ns))
    assert error is not None and error.startswith("failure to start proxy")
    assert w.uid in daemon.manager.failed()
    await wait_until_async(lambda: daemon.manager.pod_state(w.uid) is PodState.UP, "retried pod up")
    assert daemon.manager.failed() == {}
    assert await echo(ns, 15006, b"again") == b"again"
    assert daemon.client.ready  # a NACK for a proxy failure does not end the connection
    assert env.agent.connections_seen == 1


@pytest.mark.asyncio
async def test_new_netns_for_the_same_uid_replaces_the_proxy(env: Env) -> None:
    w = workload("uid-n", "n", "10.1.0.6")
    old_ns, new_ns = env.pod_netns("n-old"), env.pod_netns("n-new")
    daemon = env.start_daemon((w,))
    await env.agent.wait_snapshots(1)
    await env.agent.add_pod(w.uid, info_of(w), netns_path(old_ns))
    await env.agent.add_pod(w.uid, info_of(w), netns_path(old_ns))  # same netns: idempotent
    assert len(daemon.factory.started) == 1

    assert await env.agent.add_pod(w.uid, info_of(w), netns_path(new_ns)) == ""
    assert listening_ports(old_ns).isdisjoint(PORTS)
    assert set(PORTS) <= listening_ports(new_ns)
    assert len(daemon.factory.started) == 2
    assert daemon.factory.handles[w.uid].stopped is False
    assert daemon.metric("workload_manager_proxies_stopped_total") == 1
    assert daemon.metric("workload_manager_active_proxy_count") == 1


@pytest.mark.asyncio
async def test_agent_restart_with_a_snapshot_that_drops_a_pod(env: Env) -> None:
    keep, gone = workload("uid-k", "k", "10.1.0.7"), workload("uid-g", "g", "10.1.0.8")
    ns_keep, ns_gone = env.pod_netns("k"), env.pod_netns("g")
    daemon = env.start_daemon((keep, gone))
    await env.agent.wait_snapshots(1)
    await env.agent.add_pod(keep.uid, info_of(keep), netns_path(ns_keep))
    await env.agent.add_pod(gone.uid, info_of(gone), netns_path(ns_gone))
    kept_listeners = daemon.manager.listeners_of(keep.uid)

    await env.agent.restart(drop=[gone.uid])
    await env.agent.wait_snapshots(2)
    await wait_until_async(lambda: daemon.client.ready, "ready after the new snapshot")

    assert set(daemon.manager.pods()) == {keep.uid}
    assert listening_ports(ns_gone).isdisjoint(PORTS)
    assert set(PORTS) <= listening_ports(ns_keep)
    assert daemon.manager.listeners_of(keep.uid) is kept_listeners  # not restarted
    assert len(daemon.factory.started) == 2
    assert daemon.ready_changes == [True, False, True]


@pytest.mark.asyncio
async def test_keep_in_the_snapshot_keeps_a_pod_without_its_netns(env: Env) -> None:
    w = workload("uid-keep", "keep", "10.1.0.10")
    ns = env.pod_netns("keep")
    daemon = env.start_daemon((w,))
    await env.agent.wait_snapshots(1)
    await env.agent.add_pod(w.uid, info_of(w), netns_path(ns))
    env.agent.forget_netns(w.uid)
    await env.agent.restart()
    await env.agent.wait_snapshots(2)
    assert ("keep uid-keep", "") in env.agent.acks
    assert daemon.manager.pod_state(w.uid) is PodState.UP
    assert set(PORTS) <= listening_ports(ns)


@pytest.mark.asyncio
async def test_reconnects_keep_pods_and_a_new_daemon_reenrols_all(env: Env) -> None:
    pods = [workload(f"uid-{i}", f"p{i}", f"10.1.1.{i}") for i in range(1, 4)]
    namespaces = [env.pod_netns(f"p{i}") for i in range(1, 4)]
    first = env.start_daemon(tuple(pods))
    await env.agent.wait_snapshots(1)
    for w, ns in zip(pods, namespaces, strict=True):
        await env.agent.add_pod(w.uid, info_of(w), netns_path(ns))

    # The connection breaks; the same daemon reconnects, the replay is idempotent.
    await env.agent.drop_connections()
    await env.agent.wait_snapshots(2)
    await wait_until_async(lambda: first.client.ready, "reconnected")
    assert env.agent.connections_seen == 2
    assert len(first.factory.started) == 3
    assert all(first.manager.pod_state(w.uid) is PodState.UP for w in pods)

    # The daemon restarts: its successor gets every pod from the snapshot replay.
    await first.stop()
    env.daemons.remove(first)
    for ns in namespaces:
        assert listening_ports(ns).isdisjoint(PORTS)
    second = env.start_daemon(tuple(pods), greeting=b"2:")
    await env.agent.wait_snapshots(3)
    assert {p.uid for p in second.factory.started} == {w.uid for w in pods}
    for ns in namespaces:
        assert await echo(ns, 15008, b"hi", b"2:") == b"2:hi"


@pytest.mark.asyncio
async def test_protocol_errors_nack_and_reconnect_without_leaking_fds(env: Env) -> None:
    w = workload("uid-p", "p", "10.1.0.11")
    ns = env.pod_netns("p")
    daemon = env.start_daemon((w,))
    await env.agent.wait_snapshots(1)
    await env.agent.add_pod(w.uid, info_of(w), netns_path(ns))
    fds_before = len(os.listdir("/proc/self/fd"))

    extra = [os.open(netns_path(ns), os.O_RDONLY), os.open(netns_path(ns), os.O_RDONLY)]
    try:
        error = await env.agent.send_raw(b"\x12\x03\x12\x01x", extra, what="del with 2 fds")
    finally:
        for fd in extra:
            os.close(fd)
    assert error.startswith("failure to read message: expected at most 1 file descriptor, got 2")
    await env.agent.wait_snapshots(2)  # the daemon reconnected and got a new snapshot

    error = await env.agent.send_raw(encode_keep(w.uid), what="keep after snapshot")
    assert "keep for pod 'uid-p' received after the snapshot" in error
    await env.agent.wait_snapshots(3)
    await wait_until_async(lambda: daemon.client.ready, "ready again")

    assert daemon.manager.pod_state(w.uid) is PodState.UP  # bad input never dropped the pod
    assert len(daemon.factory.started) == 1
    assert len(os.listdir("/proc/self/fd")) == fds_before


@pytest.mark.asyncio
async def test_reuseport_handover_to_a_second_daemon(env: Env, pool: NetnsPool) -> None:
    w = workload("uid-h", "h", "10.1.0.12")
    ns = env.pod_netns("h")
    old = env.start_daemon((w,), greeting=b"old:")
    await env.agent.wait_snapshots(1)
    await env.agent.add_pod(w.uid, info_of(w), netns_path(ns))
    reader, writer = await connect_in(ns, 15008)  # held by the old daemon
    assert await reader.readexactly(4) == b"old:"

    # Without SO_REUSEPORT a second daemon cannot bind while the first holds the ports.
    state = ProxyState()
    state.apply(UpdateBatch(workloads=(w,)))
    strict = WorkloadManager(
        state, EchoPodProxyFactory(), options=ListenerOptions(reuse_port=False)
    )
    with pytest.raises(EnrollmentError, match="Address already in use"):
        await strict.enroll(w.uid, info_of(w), os.open(netns_path(ns), os.O_RDONLY))
    await strict.shutdown(0.0)

    new_factory = EchoPodProxyFactory(b"new:")
    new = WorkloadManager(state, new_factory)
    await new.enroll(w.uid, info_of(w), os.open(netns_path(ns), os.O_RDONLY))
    new_listeners, old_listeners = new.listeners_of(w.uid), old.manager.listeners_of(w.uid)
    assert new_listeners is not None and old_listeners is not None
    old_inodes = inodes_of(old_listeners)
    both = listener_inodes(ns)
    assert inodes_of(new_listeners) <= both and old_inodes <= both

    # The old daemon drains: listeners close at once, its live connection may finish.
    draining = asyncio.get_running_loop().create_task(old.manager.shutdown(60.0))
    await wait_until_async(lambda: old_inodes.isdisjoint(listener_inodes(ns)), "old closed")
    assert not draining.done()
    assert await echo(ns, 15008, b"fresh", b"new:") == b"new:fresh"
    writer.write(b"still here")
    assert await reader.readexactly(10) == b"still here"
    writer.close()
    await draining
    env.daemons.remove(old)
    old.client.close()
    assert old.task is not None
    await old.task
    assert await echo(ns, 15001, b"after", b"new:") == b"new:after"
    await new.shutdown(0.0)


class _RecordingListener:
    def __init__(self) -> None:
        self.events: list[tuple[str, str, int, tuple[str, ...]]] = []

    def pod_added(self, pod: EnrolledPod, listeners: PodListeners) -> None:
        assert listeners.inbound_plaintext.fileno() >= 0
        self.events.append(("added", pod.uid, pod.netns_cookie, tuple(map(str, pod.ips))))

    def pod_removed(self, pod: EnrolledPod) -> None:
        self.events.append(("removed", pod.uid, pod.netns_cookie, tuple(map(str, pod.ips))))


@pytest.mark.asyncio
async def test_enrollment_listeners_hear_added_and_removed(env: Env) -> None:
    w = workload("uid-e", "e", "10.1.0.13")
    ns = env.pod_netns("e")
    daemon = env.start_daemon((w,))
    hook = _RecordingListener()
    daemon.manager.enrollment_listeners.append(hook)
    await env.agent.wait_snapshots(1)
    await env.agent.add_pod(w.uid, info_of(w), netns_path(ns))
    await env.agent.del_pod(w.uid)
    cookie = ns.run(_cookie_here)
    assert hook.events == [
        ("added", w.uid, cookie, ("10.1.0.13",)),
        ("removed", w.uid, cookie, ("10.1.0.13",)),
    ]
