"""The in-pod workload manager: one set of listeners and one logical proxy per enrolled pod.

For each pod that ZDS names, the manager keeps the pod's netns fd and has its listeners created
*inside* the pod's netns (by an injected ``ListenerFactory``: ``redirect.listeners`` in the
daemon, plain sockets in unit tests). The listeners exist as soon as the add is acked, so the
kernel queues connections while we wait; the proxy itself starts once the pod's xDS workload
(same name, namespace and service account) is known. Until then the pod is "Pending", as it is
when its proxy failed to start; pending pods are retried when the state changes and, after a
failure, every few seconds.

The proxy servers are not built here: a ``PodProxyFactory`` turns (pod, listening sockets) into
a running ``PodProxyHandle``. ``EnrollmentListener``s (the eBPF layer) hear about each pod once
its proxy is up, and before it goes down.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import inspect
import logging
import os
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NoReturn, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge

from ztunnel_py.config import Config, WorkloadInfo
from ztunnel_py.errors import ZtunnelError
from ztunnel_py.netns import netns_cookie, netns_inode
from ztunnel_py.redirect.listeners import (
    EnrollmentError,
    ListenerFactory,
    ListenerOptions,
    PodListeners,
    create_pod_listeners,
)
from ztunnel_py.state.model import IPAddress, Workload
from ztunnel_py.state.store import ChangeSet, ProxyState

log = logging.getLogger(__name__)

RETRY_INTERVAL_S = 5.0  # ztunnel's retry period for proxies that failed to start


class PodState(enum.Enum):
    PENDING = "Pending"
    UP = "Up"


# --------------------------------------------------------------------------- contracts


@dataclass(frozen=True, slots=True)
class EnrolledPod:
    """A pod as the proxy and the eBPF layer see it.

    ``netns_fd`` belongs to the manager (valid until the pod is removed); the proxy uses it to
    open upstream sockets inside the pod. ``workload`` is the matched xDS workload (set once
    the pod's proxy starts).
    """

    uid: str
    info: WorkloadInfo
    netns_fd: int
    netns_inode: int
    netns_cookie: int = 0
    workload: Workload | None = None

    @property
    def ips(self) -> tuple[IPAddress, ...]:
        return self.workload.workload_ips if self.workload is not None else ()


class PodProxyHandle(Protocol):
    async def stop(self, deadline_s: float) -> None:
        """Close the pod's listeners first, drain its connections for up to ``deadline_s``
        seconds, then close whatever is left."""
        ...


class PodProxyFactory(Protocol):
    def start(
        self, pod: EnrolledPod, sockets: PodListeners
    ) -> PodProxyHandle | Awaitable[PodProxyHandle]:
        """Serve the pod's listeners (a coroutine is awaited). Raise ``ZtunnelError`` or
        ``OSError`` to leave the pod pending."""
        ...


class EnrollmentListener(Protocol):
    """Told when a pod's proxy is up and before it goes down (the eBPF layer's hook)."""

    def pod_added(self, pod: EnrolledPod, listeners: PodListeners) -> None:
        """Raise ``ZtunnelError``/``OSError`` to fail the start (the pod stays pending)."""
        ...

    def pod_removed(self, pod: EnrolledPod) -> None: ...


class WorkloadManagerMetrics:
    """ztunnel's in-pod metrics; their names carry no ``istio_`` prefix."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.active_proxy_count = Gauge(
            "workload_manager_active_proxy_count",
            "The total number current workloads with active proxies (unstable)",
            registry=registry,
        )
        self.pending_proxy_count = Gauge(
            "workload_manager_pending_proxy_count",
            "The total number current workloads with pending proxies (unstable)",
            registry=registry,
        )
        self.proxies_started = Counter(
            "workload_manager_proxies_started",
            "The total number of proxies that were started (unstable)",
            registry=registry,
        )
        self.proxies_stopped = Counter(
            "workload_manager_proxies_stopped",
            "The total number of proxies that were stopped (unstable)",
            registry=registry,
        )


# --------------------------------------------------------------------------- the manager


@dataclass(slots=True)
class _Pod:
    pod: EnrolledPod
    listeners: PodListeners | None = None
    handle: PodProxyHandle | None = None
    failure: str = ""  # why the last start failed; empty while merely waiting for xDS
    announced: list[EnrollmentListener] = field(default_factory=list)

    @property
    def state(self) -> PodState:
        return PodState.UP if self.handle is not None else PodState.PENDING


class WorkloadManager:
    """Implements ``zds.PodHandler``; feed it state changes with ``state_changed``."""

    def __init__(
        self,
        state: ProxyState,
        factory: PodProxyFactory,
        *,
        options: ListenerOptions | None = None,
        metrics: WorkloadManagerMetrics | None = None,
        listeners: Sequence[EnrollmentListener] = (),
        termination_deadline_s: float = 5.0,
        retry_interval_s: float = RETRY_INTERVAL_S,
        create_listeners: ListenerFactory = create_pod_listeners,
        demand_workload: Callable[[WorkloadInfo], None] | None = None,
    ) -> None:
        self.state = state
        self.factory = factory
        self.options = options or ListenerOptions()
        self.metrics = metrics
        self.enrollment_listeners: list[EnrollmentListener] = list(listeners)
        self.termination_deadline_s = termination_deadline_s
        self.retry_interval_s = retry_interval_s
        self._create_listeners = create_listeners
        self.demand_workload = demand_workload
        self._pods: dict[str, _Pod] = {}
        self._lock = asyncio.Lock()
        self._retry_task: asyncio.Task[None] | None = None
        self._kick_task: asyncio.Task[None] | None = None
        self._closed = False

    @classmethod
    def from_config(
        cls,
        config: Config,
        state: ProxyState,
        factory: PodProxyFactory,
        registry: CollectorRegistry,
        *,
        listeners: Sequence[EnrollmentListener] = (),
    ) -> WorkloadManager:
        return cls(
            state,
            factory,
            options=ListenerOptions.from_config(config),
            metrics=WorkloadManagerMetrics(registry),
            listeners=listeners,
            termination_deadline_s=config.connection_termination_deadline_s,
        )

    # ------------------------------------------------------------------ queries

    def pods(self) -> Mapping[str, EnrolledPod]:
        return {uid: rec.pod for uid, rec in self._pods.items()}

    def pod_state(self, uid: str) -> PodState | None:
        rec = self._pods.get(uid)
        return rec.state if rec is not None else None

    def listeners_of(self, uid: str) -> PodListeners | None:
        rec = self._pods.get(uid)
        return rec.listeners if rec is not None else None

    @property
    def active_count(self) -> int:
        return sum(1 for rec in self._pods.values() if rec.state is PodState.UP)

    @property
    def pending_count(self) -> int:
        return len(self._pods) - self.active_count

    def failed(self) -> dict[str, str]:
        """Pods whose proxy failed to start, with the reason (they block readiness in ztunnel)."""
        return {uid: rec.failure for uid, rec in self._pods.items() if rec.failure}

    def dump(self) -> dict[str, Any]:
        """``/config_dump`` ``workloadState``: uid -> {info, state}, as ztunnel writes it."""
        return {
            uid: {
                "info": {
                    "name": rec.pod.info.name,
                    "namespace": rec.pod.info.namespace,
                    "serviceAccount": rec.pod.info.service_account,
                },
                "state": rec.state.value,
            }
            for uid, rec in sorted(self._pods.items())
        }

    # ------------------------------------------------------------------ ZDS handler

    async def enroll(self, uid: str, info: WorkloadInfo, netns_fd: int) -> None:
        async with self._lock:
            try:
                inode = netns_inode(netns_fd)
            except OSError:
                os.close(netns_fd)
                raise
            rec = self._pods.get(uid)
            if rec is not None:
                if rec.pod.netns_inode == inode:
                    os.close(netns_fd)  # a replay of what we hold: the fd we have is as good
                    if rec.state is PodState.UP:
                        return
                    if rec.pod.info != info:
                        rec.pod = dataclasses.replace(rec.pod, info=info)
                    await self._start(rec)
                    return
                log.info("pod %s has a new netns, replacing its proxy", uid)
                del self._pods[uid]
                await self._stop(rec, 0.0)
            rec = _Pod(EnrolledPod(uid, info, netns_fd, inode))
            self._pods[uid] = rec
            try:
                await self._start(rec)
            finally:
                self._update_gauges()

    async def remove(self, uid: str) -> None:
        async with self._lock:
            rec = self._pods.pop(uid, None)
            if rec is None:
                return
            # The pod is gone: no point in draining its connections gracefully.
            await self._stop(rec, 0.0)
            self._update_gauges()

    # ------------------------------------------------------------------ state and retries

    def state_changed(self, changes: ChangeSet | None = None) -> None:
        """A ``StateHub`` subscriber: pending pods may now find their workload."""
        if self._closed or not any(r.state is PodState.PENDING for r in self._pods.values()):
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # not on the event loop (a config load at startup): nothing is pending yet
        if self._kick_task is None or self._kick_task.done():
            self._kick_task = loop.create_task(self.retry_pending())

    async def retry_pending(self) -> None:
        async with self._lock:
            for rec in list(self._pods.values()):
                if rec.state is PodState.PENDING and self._pods.get(rec.pod.uid) is rec:
                    with contextlib.suppress(EnrollmentError):
                        await self._start(rec)
            self._update_gauges()

    async def shutdown(self, deadline_s: float | None = None) -> None:
        """Drain every pod's proxy (listeners close first) within the termination deadline.

        The pods themselves stay enrolled: enrollment listeners are not told (the eBPF layer's
        pinned state keeps them failing closed, and a daemon taking over shares that state).
        """
        self._closed = True
        for task in (self._retry_task, self._kick_task):
            if task is not None and task is not asyncio.current_task():
                task.cancel()
        deadline = self.termination_deadline_s if deadline_s is None else deadline_s
        async with self._lock:
            recs = list(self._pods.values())
            self._pods.clear()
            await asyncio.gather(*(self._stop(rec, deadline, unenroll=False) for rec in recs))
            self._update_gauges()

    # ------------------------------------------------------------------ internals

    async def _start(self, rec: _Pod) -> None:
        """Bring ``rec`` up as far as possible; raises ``EnrollmentError`` on a failure."""
        pod = rec.pod
        if rec.listeners is None:
            try:
                rec.listeners = self._create_listeners(pod.netns_fd, self.options)
                rec.pod = pod = dataclasses.replace(
                    pod, netns_cookie=netns_cookie(rec.listeners.outbound)
                )
            except (OSError, ZtunnelError) as e:
                self._failed(rec, f"cannot create listeners in the pod netns: {_describe(e)}")
        workload = self.state.find_workload(
            namespace=pod.info.namespace,
            name=pod.info.name,
            service_account=pod.info.service_account,
        )
        if workload is None:
            rec.failure = ""
            log.info("pod %s is pending: %s", pod.uid, _waiting_for_xds(pod.info))
            if self.demand_workload is not None:
                self.demand_workload(pod.info)  # on-demand xDS: ask istiod for it
            return
        rec.pod = pod = dataclasses.replace(pod, workload=workload)
        assert rec.listeners is not None
        try:
            started = self.factory.start(pod, rec.listeners)
            handle = await started if inspect.isawaitable(started) else started
        except (OSError, ZtunnelError) as e:
            # The factory may have used the sockets: start the next attempt from fresh ones.
            rec.listeners.close()
            rec.listeners = None
            self._failed(rec, f"proxy failed to start: {_describe(e)}")
        rec.handle = handle
        try:
            for listener in self.enrollment_listeners:
                listener.pod_added(pod, rec.listeners)
                rec.announced.append(listener)
        except (OSError, ZtunnelError) as e:
            await self._stop_proxy(rec, 0.0)
            self._failed(rec, f"enrollment failed: {_describe(e)}")
        rec.failure = ""
        if self.metrics is not None:
            self.metrics.proxies_started.inc()
        log.info(
            "proxy up for pod %s (%s/%s), ips %s",
            pod.uid,
            pod.info.namespace,
            pod.info.name,
            ",".join(map(str, pod.ips)) or "-",
        )

    def _failed(self, rec: _Pod, reason: str) -> NoReturn:
        rec.failure = reason
        log.error("pod %s: %s; retrying in %.0fs", rec.pod.uid, reason, self.retry_interval_s)
        self._schedule_retry()
        raise EnrollmentError(reason)

    async def _stop_proxy(self, rec: _Pod, deadline_s: float, *, unenroll: bool = True) -> None:
        """Undo enrollment listeners (in reverse, unless ``unenroll`` is false), then stop the
        proxy and close its sockets."""
        for listener in reversed(rec.announced if unenroll else ()):
            try:
                listener.pod_removed(rec.pod)
            except (OSError, ZtunnelError) as e:
                log.error("enrollment listener failed to remove pod %s: %s", rec.pod.uid, e)
        rec.announced.clear()
        handle, rec.handle = rec.handle, None
        if handle is not None:
            try:
                await handle.stop(deadline_s)
            except (OSError, ZtunnelError) as e:
                log.error("stopping the proxy of pod %s failed: %s", rec.pod.uid, e)
            if self.metrics is not None:
                self.metrics.proxies_stopped.inc()
        if rec.listeners is not None:
            rec.listeners.close()
            rec.listeners = None

    async def _stop(self, rec: _Pod, deadline_s: float, *, unenroll: bool = True) -> None:
        await self._stop_proxy(rec, deadline_s, unenroll=unenroll)
        with contextlib.suppress(OSError):
            os.close(rec.pod.netns_fd)
        log.info("pod %s %s", rec.pod.uid, "removed" if unenroll else "no longer served here")

    def _schedule_retry(self) -> None:
        if self._closed or (self._retry_task is not None and not self._retry_task.done()):
            return
        self._retry_task = asyncio.get_running_loop().create_task(self._retry_loop())

    async def _retry_loop(self) -> None:
        while self.failed() and not self._closed:
            await asyncio.sleep(self.retry_interval_s)
            await self.retry_pending()

    def _update_gauges(self) -> None:
        if self.metrics is not None:
            self.metrics.active_proxy_count.set(self.active_count)
            self.metrics.pending_proxy_count.set(self.pending_count)


def _waiting_for_xds(info: WorkloadInfo) -> str:
    return (
        f"waiting for the xDS workload {info.namespace}/{info.name} "
        f"(service account {info.service_account})"
    )


def _describe(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror:
        return f"{e.strerror} (errno {e.errno})"
    return str(e)
