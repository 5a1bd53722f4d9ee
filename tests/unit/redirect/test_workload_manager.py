"""The workload manager's pending, retry and failed states, without root or a pod netns.

The manager only fstat()s the netns fd and reads the netns cookie of a listener, so plain
files stand in for network namespaces and unbound sockets for the in-pod listeners
(``redirect.listeners`` is exercised with real namespaces in tests/netns/redirect).
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from ztunnel_py.config import WorkloadInfo
from ztunnel_py.errors import ZtunnelError
from ztunnel_py.redirect.listeners import EnrollmentError, ListenerOptions, PodListeners
from ztunnel_py.redirect.workloads import (
    EnrolledPod,
    PodState,
    WorkloadManager,
    WorkloadManagerMetrics,
)
from ztunnel_py.state.model import Workload
from ztunnel_py.state.store import ProxyState, UpdateBatch
from ztunnel_py.testing.poll import wait_until_async

INFO = WorkloadInfo(namespace="default", name="web-1", service_account="web")
UID = "pod-uid-1"
WORKLOAD = Workload(
    uid="Kubernetes//Pod/default/web-1",
    name="web-1",
    namespace="default",
    service_account="web",
)


class Listeners:
    """A ``ListenerFactory`` of unbound sockets; ``fail_next`` makes the next calls fail."""

    def __init__(self) -> None:
        self.made: list[PodListeners] = []
        self.fail_next = 0

    def __call__(self, netns_fd: int | None, options: ListenerOptions) -> PodListeners:
        if self.fail_next > 0:
            self.fail_next -= 1
            raise OSError(98, "Address already in use")
        made = PodListeners(*(socket.socket() for _ in range(3)))
        self.made.append(made)
        return made


class Handle:
    def __init__(self) -> None:
        self.stopped: list[float] = []

    async def stop(self, deadline_s: float) -> None:
        self.stopped.append(deadline_s)


class Proxies:
    """A ``PodProxyFactory`` that records what it started."""

    def __init__(self) -> None:
        self.started: list[tuple[EnrolledPod, PodListeners, Handle]] = []
        self.fail_next = 0

    async def start(self, pod: EnrolledPod, sockets: PodListeners) -> Handle:
        if self.fail_next > 0:
            self.fail_next -= 1
            raise ZtunnelError("certificate not available")
        handle = Handle()
        self.started.append((pod, sockets, handle))
        return handle


class Announced:
    """An ``EnrollmentListener`` (the eBPF layer's hook)."""

    def __init__(self) -> None:
        self.added: list[str] = []
        self.removed: list[str] = []
        self.fail_next = 0

    def pod_added(self, pod: EnrolledPod, listeners: PodListeners) -> None:
        if self.fail_next > 0:
            self.fail_next -= 1
            raise OSError(1, "Operation not permitted")
        self.added.append(pod.uid)

    def pod_removed(self, pod: EnrolledPod) -> None:
        self.removed.append(pod.uid)


class Netns:
    """Files standing in for network namespaces: one inode per name."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def open(self, name: str = "pod") -> int:
        path = self.root / name
        path.touch()
        return os.open(path, os.O_RDONLY)


def is_closed(fd: int, name: str = "pod") -> bool:
    """``fd`` no longer holds the netns file ``name`` (its number may have been reused)."""
    try:
        return Path(os.readlink(f"/proc/self/fd/{fd}")).name != name
    except OSError:
        return True


@pytest.fixture
def netns(tmp_path: Path) -> Netns:
    return Netns(tmp_path)


def manager(
    state: ProxyState,
    proxies: Proxies,
    listeners: Listeners,
    *,
    announced: Announced | None = None,
    registry: CollectorRegistry | None = None,
) -> WorkloadManager:
    return WorkloadManager(
        state,
        proxies,
        create_listeners=listeners,
        listeners=(announced,) if announced is not None else (),
        metrics=WorkloadManagerMetrics(registry) if registry is not None else None,
        retry_interval_s=0.01,
    )


@pytest.mark.asyncio
async def test_pod_without_xds_workload_is_pending_then_starts_on_the_state_change(
    netns: Netns,
) -> None:
    state, proxies, listeners, registry = ProxyState(), Proxies(), Listeners(), CollectorRegistry()
    m = manager(state, proxies, listeners, registry=registry)
    demanded: list[WorkloadInfo] = []
    m.demand_workload = demanded.append
    await m.enroll(UID, INFO, netns.open())
    # Listeners exist at once (the kernel queues connections); the proxy waits for xDS.
    assert m.pod_state(UID) is PodState.PENDING
    assert m.failed() == {}
    assert len(listeners.made) == 1 and proxies.started == []
    assert demanded == [INFO]
    assert registry.get_sample_value("workload_manager_pending_proxy_count") == 1
    state.apply(UpdateBatch(workloads=(WORKLOAD,)))
    m.state_changed()
    await wait_until_async(lambda: m.pod_state(UID) is PodState.UP, "the pod's proxy")
    ((pod, sockets, _),) = proxies.started
    assert pod.workload == WORKLOAD and sockets is listeners.made[0]
    assert pod.netns_cookie != 0
    assert registry.get_sample_value("workload_manager_active_proxy_count") == 1
    assert registry.get_sample_value("workload_manager_proxies_started_total") == 1
    assert m.dump()[UID] == {
        "info": {"name": "web-1", "namespace": "default", "serviceAccount": "web"},
        "state": "Up",
    }
    await m.shutdown(0.0)


@pytest.mark.asyncio
async def test_listener_failure_is_reported_and_retried(netns: Netns) -> None:
    state, proxies, listeners = ProxyState(), Proxies(), Listeners()
    state.apply(UpdateBatch(workloads=(WORKLOAD,)))
    m = manager(state, proxies, listeners)
    listeners.fail_next = 2
    with pytest.raises(EnrollmentError, match=r"cannot create listeners.*Address already in use"):
        await m.enroll(UID, INFO, netns.open())
    assert m.pod_state(UID) is PodState.PENDING
    assert "Address already in use (errno 98)" in m.failed()[UID]
    # The retry loop keeps trying on its own until the listeners can be made.
    await wait_until_async(lambda: m.pod_state(UID) is PodState.UP, "the retried start")
    assert m.failed() == {} and listeners.fail_next == 0
    await m.shutdown(0.0)


@pytest.mark.asyncio
async def test_proxy_failure_retries_with_fresh_listeners(netns: Netns) -> None:
    state, proxies, listeners = ProxyState(), Proxies(), Listeners()
    state.apply(UpdateBatch(workloads=(WORKLOAD,)))
    m = manager(state, proxies, listeners)
    proxies.fail_next = 1
    with pytest.raises(EnrollmentError, match="proxy failed to start: certificate not available"):
        await m.enroll(UID, INFO, netns.open())
    first = listeners.made[0]
    assert all(s.fileno() == -1 for s in first.sockets())  # the failed start's sockets closed
    await wait_until_async(lambda: m.pod_state(UID) is PodState.UP, "the retried start")
    assert len(listeners.made) == 2 and proxies.started[0][1] is listeners.made[1]
    await m.shutdown(0.0)


@pytest.mark.asyncio
async def test_enrollment_listener_failure_stops_the_proxy_and_retries(netns: Netns) -> None:
    state, proxies, listeners, announced = ProxyState(), Proxies(), Listeners(), Announced()
    state.apply(UpdateBatch(workloads=(WORKLOAD,)))
    m = manager(state, proxies, listeners, announced=announced)
    announced.fail_next = 1
    with pytest.raises(EnrollmentError, match="enrollment failed: Operation not permitted"):
        await m.enroll(UID, INFO, netns.open())
    assert proxies.started[0][2].stopped == [0.0]
    await wait_until_async(lambda: m.pod_state(UID) is PodState.UP, "the retried start")
    assert announced.added == [UID] and announced.removed == []
    await m.shutdown(0.0)


@pytest.mark.asyncio
async def test_replay_keeps_the_pod_and_a_new_netns_replaces_it(netns: Netns) -> None:
    state, proxies, listeners, announced = ProxyState(), Proxies(), Listeners(), Announced()
    state.apply(UpdateBatch(workloads=(WORKLOAD,)))
    m = manager(state, proxies, listeners, announced=announced)
    first_fd = netns.open("a")
    await m.enroll(UID, INFO, first_fd)
    replay_fd = netns.open("a")  # the same namespace sent again
    await m.enroll(UID, INFO, replay_fd)
    assert is_closed(replay_fd, "a") and not is_closed(first_fd, "a")
    assert len(proxies.started) == 1
    await m.enroll(UID, INFO, netns.open("b"))  # the pod was recreated: a new netns
    assert is_closed(first_fd, "a")
    assert proxies.started[0][2].stopped == [0.0]
    assert announced.added == [UID, UID] and announced.removed == [UID]
    assert len(proxies.started) == 2 and m.pod_state(UID) is PodState.UP
    await m.shutdown(0.0)


@pytest.mark.asyncio
async def test_remove_unannounces_stops_and_closes_everything(netns: Netns) -> None:
    state, proxies, listeners, announced = ProxyState(), Proxies(), Listeners(), Announced()
    state.apply(UpdateBatch(workloads=(WORKLOAD,)))
    m = manager(state, proxies, listeners, announced=announced)
    fd = netns.open()
    await m.enroll(UID, INFO, fd)
    await m.remove(UID)
    assert announced.removed == [UID]
    assert proxies.started[0][2].stopped == [0.0]
    assert all(s.fileno() == -1 for s in listeners.made[0].sockets())
    assert is_closed(fd) and m.pod_state(UID) is None
    await m.remove(UID)  # removing an unknown pod is a no-op


@pytest.mark.asyncio
async def test_shutdown_drains_but_leaves_pods_enrolled(netns: Netns) -> None:
    state, proxies, listeners, announced = ProxyState(), Proxies(), Listeners(), Announced()
    state.apply(UpdateBatch(workloads=(WORKLOAD,)))
    m = manager(state, proxies, listeners, announced=announced)
    await m.enroll(UID, INFO, netns.open())
    await m.shutdown(2.5)
    assert proxies.started[0][2].stopped == [2.5]
    # The eBPF layer is not told: its pinned state keeps the pod failing closed.
    assert announced.removed == []
    assert m.pods() == {}
    assert all(s.fileno() == -1 for s in listeners.made[0].sockets())
