"""The control plane's side of multi-worker mode: spawn, feed, replace and read the workers.

One ``WorkerPool`` in the daemon (``ZTUNNEL_WORKER_THREADS`` > 1). The daemon keeps everything
but the proxies: xDS or the local config, ZDS enrolment and the pods' listeners, BPF, the CA
client, the DNS proxies, admin, metrics and readiness. Each worker process gets the state as
batches, every pod with its netns and its three listening sockets (the same sockets in every
worker: one accept queue per port, see ARCHITECTURE.md), and certificates on request. A worker
that dies is replaced (after a backoff if it never served); one that drains (SIGTERM to it) is
replaced at once while it finishes its connections. Metrics and live connections of every
worker are merged under ztunnel's names (``plan.merge_families``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import sys
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from cryptography.hazmat.primitives.serialization import Encoding
from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import Metric

from ztunnel_py.config import Config, RedirectMode
from ztunnel_py.dataplane import PodProxyStarter
from ztunnel_py.errors import ZtunnelError
from ztunnel_py.identity.certificate import WorkloadCertificate
from ztunnel_py.identity.manager import SecretManager
from ztunnel_py.identity.spiffe import Identity
from ztunnel_py.readiness import Readiness
from ztunnel_py.redirect.listeners import PodListeners
from ztunnel_py.redirect.workloads import EnrolledPod
from ztunnel_py.state.hub import StateHub
from ztunnel_py.state.store import ChangeSet
from ztunnel_py.telemetry.logging import LevelController
from ztunnel_py.workers import messages as m
from ztunnel_py.workers.channel import Channel, ChannelClosed
from ztunnel_py.workers.plan import (
    WorkerTable,
    batch_for,
    merge_connections,
    merge_families,
    retired_counts,
    snapshot,
)

if TYPE_CHECKING:
    from ztunnel_py.dns.server import DnsServer  # dnspython: loaded with the first pod

log = logging.getLogger(__name__)

READY_WORKERS = "workers"
COLLECT_TIMEOUT_S = 5.0  # a worker that does not answer a scrape keeps its last figures
VIEWS_REFRESH_S = 2.0  # /debug connections of the workers are at most this old
STOP_POD_MARGIN_S = 5.0  # beyond the drain deadline, for a worker to say a pod stopped


def _pem(cert: WorkloadCertificate) -> tuple[bytes, ...]:
    roots = b"".join(r.public_bytes(Encoding.PEM) for r in cert.roots)
    chain = [cert.leaf, *cert.intermediates]
    return (*(c.public_bytes(Encoding.PEM) for c in chain), roots)


@dataclass(eq=False)
class _Link:
    """One worker process and its channel; messages go out in order through ``outbox``."""

    worker_id: int
    channel: Channel
    process: asyncio.subprocess.Process
    outbox: asyncio.Queue[tuple[object, tuple[int, ...]]] = field(default_factory=asyncio.Queue)
    stopped: dict[str, asyncio.Future[None]] = field(default_factory=dict)

    def enqueue(self, message: object, fds: Iterable[int] = ()) -> None:
        """Queue ``message``; ``fds`` are duplicated now (the originals may close first)."""
        self.outbox.put_nowait((message, tuple(os.dup(fd) for fd in fds)))

    async def send_all(self) -> None:
        while True:
            message, fds = await self.outbox.get()
            try:
                await self.channel.send(message, fds)
            finally:
                for fd in fds:
                    os.close(fd)

    def discard_outbox(self) -> None:
        while not self.outbox.empty():
            _, fds = self.outbox.get_nowait()
            for fd in fds:
                os.close(fd)


@dataclass(slots=True)
class _ServedPod:
    pod: EnrolledPod
    listeners: PodListeners
    workload_uid: str

    def message(self) -> tuple[m.ServePod, tuple[int, ...]]:
        fds = (self.pod.netns_fd, *(s.fileno() for s in self.listeners.sockets()))
        pod = self.pod
        serve = m.ServePod(pod.uid, pod.info, self.workload_uid, pod.netns_inode, pod.netns_cookie)
        return serve, fds


class WorkerPool:
    def __init__(
        self,
        *,
        config: Config,
        hub: StateHub,
        secrets: SecretManager,
        readiness: Readiness,
        own_registry: CollectorRegistry,
        levels: LevelController,
        spawn: Callable[[str, Coroutine[Any, Any, None]], None],
    ) -> None:
        self.config = config
        self.hub = hub
        self.secrets = secrets
        self.readiness = readiness
        self.own_registry = own_registry
        self.levels = levels
        levels.followers.append(self._levels_changed)
        self.spawn = spawn
        self.table = WorkerTable(config.worker_threads)
        self.links: dict[int, _Link] = {}
        self.pods: dict[str, _ServedPod] = {}
        self.redirect_mode = RedirectMode.IPTABLES
        self.orig_dst_map_fd: int | None = None
        self.restarts = 0
        self._families: dict[int, list[Metric]] = {}
        self._retired: list[Metric] = []
        self._connections: dict[int, dict[str, Any]] = {}
        self._pools: dict[int, dict[str, Any]] = {}
        self._collecting: dict[int, asyncio.Future[m.Collected]] = {}
        self._next_request = 0
        self._stopping = False
        hub.subscribe("workers", self._state_changed)
        secrets.add_listener(self._certificates_changed)
        readiness.block(READY_WORKERS, f"starting {self.table.count} workers")

    # ---------------------------------------------------------------- wiring

    def pods_factory(self, local: PodProxyStarter) -> WorkerPods:
        """The workload manager's ``PodProxyFactory`` in multi-worker mode."""
        return WorkerPods(self, local)

    def exposed_registry(self) -> CollectorRegistry:
        """What the metrics port serves: the daemon's own families and the workers', merged."""
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_MergedCollector(self))
        return registry

    async def start(self, redirect_mode: RedirectMode, orig_dst_map_fd: int | None) -> None:
        self.redirect_mode = redirect_mode
        self.orig_dst_map_fd = orig_dst_map_fd
        log.info("starting %d data-plane workers", self.table.count)
        for slot in self.table.empty_slots():
            await self._spawn(slot)

    async def _spawn(self, slot: int) -> None:
        record = self.table.spawn(slot)
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "ztunnel_py.workers.worker",
                str(child.fileno()),
                pass_fds=(child.fileno(),),
            )
        except OSError:
            parent.close()
            self.table.exited(record.worker_id, stopping=True)
            raise
        finally:
            child.close()
        link = _Link(record.worker_id, Channel(parent), process)
        self.links[record.worker_id] = link
        map_fds = () if self.orig_dst_map_fd is None else (self.orig_dst_map_fd,)
        link.enqueue(m.Hello(record.worker_id, self.redirect_mode, self.levels.spec), map_fds)
        link.enqueue(m.ApplyState(snapshot(self.hub.state)))
        for served in self.pods.values():
            link.enqueue(*served.message())
        link.enqueue(m.SyncDone())
        log.info("worker %d started (pid %d, slot %d)", record.worker_id, process.pid, slot)
        self.spawn(f"worker {record.worker_id}", self._run_link(link))

    async def _run_link(self, link: _Link) -> None:
        sender = asyncio.create_task(link.send_all())
        receiver = asyncio.create_task(self._receive(link))
        exited = asyncio.create_task(link.process.wait())
        try:
            await asyncio.wait({sender, receiver, exited}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (sender, receiver):
                task.cancel()
            for task in (sender, receiver):
                try:
                    await task
                except (asyncio.CancelledError, ChannelClosed):
                    pass
                except Exception:  # our bug: lose this worker (it is replaced), not the daemon
                    log.exception("worker %d: its channel failed; killing it", link.worker_id)
            link.discard_outbox()
            link.channel.close()
            if not exited.done():  # the channel is gone: the worker cannot be fed any more
                with contextlib.suppress(ProcessLookupError):
                    link.process.kill()
        code = await exited
        self._gone(link, code)

    def _gone(self, link: _Link, code: int) -> None:
        self.links.pop(link.worker_id, None)
        for waiter in link.stopped.values():
            if not waiter.done():
                waiter.set_result(None)
        last = self._families.pop(link.worker_id, [])
        self._retired = merge_families([self._retired, retired_counts(last)])
        self._connections.pop(link.worker_id, None)
        self._pools.pop(link.worker_id, None)
        restart = self.table.exited(link.worker_id, stopping=self._stopping)
        if restart is None:
            log.info("worker %d exited (%d)", link.worker_id, code)
            return
        log.warning("worker %d exited (%d); replacing it", link.worker_id, code)
        self.restarts += 1
        self._follow_readiness()
        self.spawn(f"replace worker {link.worker_id}", self._respawn(restart.slot, restart.delay_s))

    async def _respawn(self, slot: int, delay_s: float) -> None:
        if delay_s:
            await asyncio.sleep(delay_s)
        if not self._stopping:
            await self._spawn(slot)

    async def _receive(self, link: _Link) -> None:
        while True:
            message, fds = await link.channel.receive()
            for fd in fds:  # workers send none; never leak what a confused one sends
                os.close(fd)
            match message:
                case m.Ready(worker_id, pid):
                    self.table.ready(worker_id, pid)
                    self._follow_readiness()
                case m.CertificateRequest(request_id, identity):
                    self.spawn(
                        f"certificate for worker {link.worker_id}",
                        self._answer(link, request_id, identity),
                    )
                case m.PodStopped(uid):
                    waiter = link.stopped.pop(uid, None)
                    if waiter is not None and not waiter.done():
                        waiter.set_result(None)
                case m.Collected(request_id):
                    answer = self._collecting.get(request_id)
                    if answer is not None and not answer.done():
                        answer.set_result(message)
                case m.Draining(worker_id):
                    slot = self.table.draining(worker_id)
                    log.info("worker %d drains; starting its replacement", worker_id)
                    if slot is not None and not self._stopping:
                        await self._spawn(slot)
                case _:
                    log.error("worker %d sent an unknown message %r", link.worker_id, type(message))

    async def _answer(self, link: _Link, request_id: int, identity: str) -> None:
        try:
            cert = await self.secrets.fetch_certificate(Identity.parse(identity))
        except (ZtunnelError, ValueError) as e:
            reply = m.CertificateReply(request_id, identity, error=str(e))
        else:
            reply = m.CertificateReply(request_id, identity, cert.private_key_pem, _pem(cert))
        link.enqueue(reply)

    def _follow_readiness(self) -> None:
        if self.table.all_serving():
            self.readiness.release(READY_WORKERS)
        else:
            self.readiness.block(READY_WORKERS, "a data-plane worker is starting")

    # ---------------------------------------------------------------- followers

    def _state_changed(self, changes: ChangeSet) -> None:
        batch = batch_for(changes, self.hub.state)
        for link in self.links.values():  # draining ones too: a new DENY must reach them
            link.enqueue(m.ApplyState(batch))

    def _levels_changed(self, spec: str) -> None:
        for link in self.links.values():
            link.enqueue(m.LogLevels(spec))

    def _certificates_changed(self) -> None:
        for link in self.links.values():
            link.enqueue(m.CertificatesChanged())

    # ---------------------------------------------------------------- pods

    def serve(self, served: _ServedPod) -> None:
        self.pods[served.pod.uid] = served
        accepting = set(self.table.accepting())
        for link in self.links.values():
            if link.worker_id in accepting:
                link.enqueue(*served.message())

    async def unserve(self, uid: str, deadline_s: float) -> None:
        """Every worker stops the pod, draining its connections; returns when all did."""
        self.pods.pop(uid, None)
        waits = []
        for link in list(self.links.values()):
            waiter = link.stopped[uid] = asyncio.get_running_loop().create_future()
            link.enqueue(m.StopPod(uid, deadline_s))
            waits.append(waiter)
        if waits:
            await asyncio.wait(waits, timeout=deadline_s + STOP_POD_MARGIN_S)

    # ---------------------------------------------------------------- views

    async def collect(self) -> None:
        """Ask every worker for its metrics and connections (before a scrape)."""
        asked: dict[int, asyncio.Future[m.Collected]] = {}
        for link in list(self.links.values()):
            self._next_request += 1
            answer = asyncio.get_running_loop().create_future()
            self._collecting[self._next_request] = answer
            asked[link.worker_id] = answer
            link.enqueue(m.Collect(self._next_request))
        if not asked:
            return
        await asyncio.wait(asked.values(), timeout=COLLECT_TIMEOUT_S)
        for worker_id, answer in asked.items():
            if answer.done() and worker_id in self.links:
                reply = answer.result()
                self._families[worker_id] = reply.families
                self._connections[worker_id] = reply.connections
                self._pools[worker_id] = reply.pools
        self._collecting = {k: v for k, v in self._collecting.items() if not v.done()}
        for answer in asked.values():
            answer.cancel()

    async def refresh_views(self) -> None:
        """Keep ``/debug`` and ``/config_dump`` connection views at most this old."""
        while True:
            await asyncio.sleep(VIEWS_REFRESH_S)
            await self.collect()

    def families(self) -> list[Metric]:
        return merge_families(
            [self.own_registry.collect(), *self._families.values(), self._retired]
        )

    def connections(self) -> dict[str, Any]:
        """Live connections of every worker, by workload uid (as of the last collection)."""
        return merge_connections(list(self._connections.values()))

    def pools(self) -> dict[str, Any]:
        return {
            f"{uid}@worker-{wid}": pool
            for wid, pools in sorted(self._pools.items())
            for uid, pool in pools.items()
        }

    def dump(self) -> dict[str, Any]:
        return {
            "count": self.table.count,
            "restarts": self.restarts,
            "workers": self.table.dump(),
        }

    # ---------------------------------------------------------------- stop

    async def stop(self, deadline_s: float) -> None:
        """Every worker drains (its pods were already stopped by the workload manager)."""
        self._stopping = True
        links = list(self.links.values())
        for link in links:
            link.enqueue(m.Drain(deadline_s))
        for link in links:
            try:
                await asyncio.wait_for(link.process.wait(), deadline_s + STOP_POD_MARGIN_S)
            except TimeoutError:
                log.warning("worker %d did not drain in time; killing it", link.worker_id)
                with contextlib.suppress(ProcessLookupError):
                    link.process.kill()
                await link.process.wait()


class _MergedCollector:
    def __init__(self, pool: WorkerPool) -> None:
        self._pool = pool

    def collect(self) -> list[Metric]:
        return self._pool.families()


class WorkerPods:
    """``PodProxyFactory``: the pod's DNS proxy here, its TCP proxies in every worker."""

    def __init__(self, pool: WorkerPool, local: PodProxyStarter) -> None:
        self._pool = pool
        self._local = local

    async def start(self, pod: EnrolledPod, listeners: PodListeners) -> _WorkerPodHandle:
        if pod.workload is None:
            raise ZtunnelError(f"pod {pod.uid} has no xDS workload yet")
        dns = await self._local.start_dns(pod.netns_fd, pod.workload.uid)
        self._pool.serve(_ServedPod(pod, listeners, pod.workload.uid))
        return _WorkerPodHandle(self._pool, pod.uid, dns)


@dataclass(slots=True)
class _WorkerPodHandle:
    pool: WorkerPool
    uid: str
    dns: DnsServer | None

    async def stop(self, deadline_s: float) -> None:
        if self.dns is not None:
            await self.dns.stop()
        await self.pool.unserve(self.uid, deadline_s)
