"""A data-plane worker process: ``python -m ztunnel_py.workers.worker <channel fd>``.

Started by the control plane (``supervisor``), configured by the same environment. It holds a
copy of the state (fed by ``ApplyState``), serves the pods it is given on the listening sockets
the control plane created in each pod's netns (shared by every worker: one accept queue per
port), re-checks its live connections when policies change, and gets certificates from the
control plane, which alone talks to the CA. SIGTERM drains this worker only; the control plane
starts its replacement at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import datetime
import logging
import os
import random
import signal
import socket
import sys
from collections.abc import Coroutine
from typing import Any

from prometheus_client import CollectorRegistry

from ztunnel_py import config as config_mod
from ztunnel_py.dataplane import DataPlane, PodProxyStarter
from ztunnel_py.errors import ZtunnelError
from ztunnel_py.identity.certificate import WorkloadCertificate
from ztunnel_py.identity.spiffe import Identity
from ztunnel_py.proxy.certificates import FetchedCertificates
from ztunnel_py.proxy.memory import tune_malloc
from ztunnel_py.readiness import Readiness
from ztunnel_py.redirect.listeners import PodListeners
from ztunnel_py.redirect.workloads import EnrolledPod, PodProxyHandle
from ztunnel_py.state.hub import StateHub
from ztunnel_py.telemetry import logging as zlog
from ztunnel_py.telemetry.metrics import ConnectionMetrics
from ztunnel_py.telemetry.sink import ProxyTelemetry
from ztunnel_py.workers import messages as m
from ztunnel_py.workers.channel import Channel, ChannelClosed

log = logging.getLogger("ztunnel_py.workers.worker")  # not __main__: run with -m


class WorkerProcess:
    def __init__(
        self, config: config_mod.Config, channel: Channel, levels: zlog.LevelController
    ) -> None:
        self.config = config
        self.levels = levels
        self.channel = channel
        self.hub = StateHub()
        self.registry = CollectorRegistry()  # only the data plane's families; no process ones
        self.telemetry = ProxyTelemetry(
            ConnectionMetrics(self.registry),
            self.hub.state,
            network=config.network,
            access_log_errors_only=config.access_log_errors_only,
        )
        self.dataplane = DataPlane(
            config=config,
            hub=self.hub,
            certificates=FetchedCertificates(
                self.fetch_certificate, tls12_enabled=config.tls12_enabled
            ),
            registry=self.registry,
            readiness=Readiness(),
            telemetry=self.telemetry,
            rng=random.Random(),
            spawn=self.spawn,
        )
        self.worker_id = -1
        self.starter: PodProxyStarter | None = None
        self.pods: dict[str, tuple[PodProxyHandle, int]] = {}  # uid -> (proxy, netns fd)
        self._certificates: dict[Identity, WorkloadCertificate] = {}
        self._asked: dict[int, asyncio.Future[m.CertificateReply]] = {}
        self._next_request = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._draining: asyncio.Task[None] | None = None
        self._starting: dict[str, asyncio.Task[None]] = {}  # pod uid -> its start
        self._drain_started = asyncio.Event()

    def spawn(self, name: str, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("worker task %s failed", task.get_name(), exc_info=task.exception())

    # ---------------------------------------------------------------- certificates

    async def fetch_certificate(self, identity: Identity) -> WorkloadCertificate:
        """The control plane's certificate for ``identity``, kept until it expires or the
        control plane says certificates changed."""
        cert = self._certificates.get(identity)
        now = datetime.datetime.now(datetime.UTC)
        if cert is not None and cert.leaf.not_valid_after_utc > now:
            return cert
        self._next_request += 1
        request_id = self._next_request
        answer = self._asked[request_id] = asyncio.get_running_loop().create_future()
        try:
            await self.channel.send(m.CertificateRequest(request_id, str(identity)))
            reply = await answer
        finally:
            self._asked.pop(request_id, None)
        if reply.error:
            raise ZtunnelError(f"no certificate for {identity}: {reply.error}")
        cert = WorkloadCertificate.from_ca_response(
            identity, reply.private_key_pem, list(reply.chain_pem)
        )
        self._certificates[identity] = cert
        return cert

    # ---------------------------------------------------------------- messages

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self._sigterm)
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's ^C is for the control plane
        # Messages are read while draining too: a policy change must still reach the
        # connections this worker finishes.
        receiving = asyncio.create_task(self._receive_all())
        try:
            await self._drain_started.wait()
            assert self._draining is not None
            await self._draining
        finally:
            receiving.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await receiving
            loop.remove_signal_handler(signal.SIGTERM)
            self.channel.close()
        return 0

    async def _receive_all(self) -> None:
        while True:
            try:
                message, fds = await self.channel.receive()
            except ChannelClosed:
                log.warning("worker %d: the control plane is gone, draining", self.worker_id)
                self._start_drain(self.config.connection_termination_deadline_s, tell=False)
                return
            await self._handle(message, fds)

    async def _handle(self, message: object, fds: list[int]) -> None:
        match message:
            case m.ApplyState(batch):
                self.hub.apply(batch)
            case m.ServePod() if self._draining is not None:
                for fd in fds:  # sent before the control plane heard of the drain
                    os.close(fd)
            case m.ServePod(uid):
                # Not awaited here: starting a pod may ask for its certificate, whose answer
                # comes over this same channel.
                self._starting[uid] = asyncio.create_task(self._serve_pod(message, fds))
            case m.StopPod(uid, deadline_s):
                self.spawn(f"stop {uid}", self._stop_pod(uid, deadline_s))
            case m.CertificateReply(request_id):
                waiter = self._asked.get(request_id)
                if waiter is not None and not waiter.done():
                    waiter.set_result(message)
            case m.CertificatesChanged():
                self._certificates.clear()
            case m.Collect(request_id):
                await self.channel.send(self._collected(request_id))
            case m.LogLevels(spec):
                self.levels.apply(spec)
            case m.Hello(worker_id, redirect_mode, log_levels):
                self.worker_id = worker_id
                self.levels.apply(log_levels)
                self.starter = self.dataplane.start_worker(redirect_mode, fds[0] if fds else None)
            case m.SyncDone():
                self.spawn("ready", self._ready(list(self._starting.values())))
            case m.Drain(deadline_s):
                self._start_drain(deadline_s, tell=False)
            case _:
                log.error("worker %d: unknown message %r", self.worker_id, type(message))
                for fd in fds:
                    os.close(fd)

    async def _serve_pod(self, message: m.ServePod, fds: list[int]) -> None:
        try:
            await self._start_pod(message, fds)
        finally:
            self._starting.pop(message.uid, None)

    async def _start_pod(self, message: m.ServePod, fds: list[int]) -> None:
        netns_fd, *listening = fds
        listeners = PodListeners(*(socket.socket(fileno=fd) for fd in listening))
        workload = self.hub.state.workload(message.workload_uid)
        pod = EnrolledPod(
            message.uid,
            message.info,
            netns_fd,
            message.netns_inode,
            message.netns_cookie,
            workload,
        )
        try:
            if self.starter is None:
                raise ZtunnelError("a pod arrived before Hello")
            handle = await self.starter.start(pod, listeners)
        except (ZtunnelError, OSError) as e:
            log.error("worker %d cannot serve pod %s: %s", self.worker_id, message.uid, e)
            listeners.close()
            os.close(netns_fd)
            return
        self.pods[message.uid] = (handle, netns_fd)

    async def _ready(self, starting: list[asyncio.Task[None]]) -> None:
        await asyncio.gather(*starting)
        await self.channel.send(m.Ready(self.worker_id, os.getpid()))

    async def _stop_pod(self, uid: str, deadline_s: float) -> None:
        starting = self._starting.get(uid)
        if starting is not None:
            await starting
        entry = self.pods.pop(uid, None)
        if entry is not None:
            handle, netns_fd = entry
            try:
                await handle.stop(deadline_s)
            finally:
                os.close(netns_fd)
        with contextlib.suppress(ChannelClosed):
            await self.channel.send(m.PodStopped(uid))

    def _collected(self, request_id: int) -> m.Collected:
        self.telemetry.flush()
        dump = self.dataplane.debug_connections()
        return m.Collected(
            request_id,
            families=list(self.registry.collect()),
            connections=dump["byWorkload"],
            pools=dump["pools"],
        )

    # ---------------------------------------------------------------- drain

    def _sigterm(self) -> None:
        log.info("worker %d: SIGTERM, draining", self.worker_id)
        self._start_drain(self.config.connection_termination_deadline_s, tell=True)

    def _start_drain(self, deadline_s: float, *, tell: bool) -> None:
        if self._draining is None:
            self._draining = asyncio.create_task(self._drain(deadline_s, tell=tell))
            self._drain_started.set()

    async def _drain(self, deadline_s: float, *, tell: bool) -> None:
        """Listeners closed at once (the other workers accept on the same queues), live
        connections given up to the deadline, then the process ends."""
        if tell:
            with contextlib.suppress(ChannelClosed):
                await self.channel.send(m.Draining(self.worker_id))
        await asyncio.gather(*self._starting.values(), return_exceptions=True)
        pods, self.pods = list(self.pods.values()), {}
        await asyncio.gather(*(handle.stop(deadline_s) for handle, _ in pods))
        for _, netns_fd in pods:
            os.close(netns_fd)
        for task in list(self._tasks):
            task.cancel()
        log.info("worker %d drained", self.worker_id)


PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """A worker never outlives its control plane: without it no policy change, certificate
    or pod removal can reach the worker, so its connections must not go on (SIGKILL with it)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG)")


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or not args[0].isdigit():
        print("usage: python -m ztunnel_py.workers.worker <channel fd>", file=sys.stderr)
        return 2
    _die_with_parent()
    config = config_mod.from_env()
    levels = zlog.configure(
        config.log_level, json_format=config.log_format is config_mod.LogFormat.JSON
    )
    tune_malloc()
    sock = socket.socket(fileno=int(args[0]))

    async def run() -> int:
        return await WorkerProcess(config, Channel(sock), levels).run()

    try:
        import uvloop
    except ImportError:
        return asyncio.run(run())
    return int(uvloop.run(run()))


if __name__ == "__main__":
    sys.exit(main())
