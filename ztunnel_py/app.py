"""Composition root: builds every part from a ``Config``, runs them, drains them.

This is the only module that knows the concrete adapters. Everything it builds is handed its
dependencies through constructors, so tests can build the same parts with fakes.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter

import ztunnel_py
from ztunnel_py.admin.debug import redact
from ztunnel_py.admin.dump import state_dump
from ztunnel_py.admin.server import AdminServer, ReadinessServer, StatsServer, new_registry
from ztunnel_py.admin.views import DebugViews
from ztunnel_py.config import Config
from ztunnel_py.dataplane import DataPlane
from ztunnel_py.debug_sources import DaemonParts, dashboard_facts, debug_providers
from ztunnel_py.identity.caclient import LocalCaClient, build_ca_client
from ztunnel_py.identity.clock import SystemClock
from ztunnel_py.identity.manager import SecretManager
from ztunnel_py.proxy.certificates import FetchedCertificates
from ztunnel_py.proxy.memory import tune_malloc
from ztunnel_py.readiness import Readiness
from ztunnel_py.signals import ShutdownController
from ztunnel_py.state.hub import StateHub
from ztunnel_py.state.node_identities import NodeCertificates
from ztunnel_py.state.store import ChangeSet
from ztunnel_py.telemetry.logging import LevelController
from ztunnel_py.telemetry.metrics import ConnectionMetrics
from ztunnel_py.telemetry.runtime import LoopMonitor, RecentLogs
from ztunnel_py.telemetry.sink import ProxyTelemetry
from ztunnel_py.workers.supervisor import WorkerPool
from ztunnel_py.xds.local_source import LocalConfigSource

if TYPE_CHECKING:
    from ztunnel_py.xds.client import XdsClient

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_FORCED = 1

READY_STATE = "state manager"
READY_CERTIFICATES = "certificates"
ON_DEMAND_TIMEOUT_S = 5.0  # how long a connection waits for an on-demand xDS answer


class App:
    def __init__(self, config: Config, *, levels: LevelController | None = None) -> None:
        self.config = config
        self.levels = levels or LevelController(config.log_level)
        self.registry = new_registry()
        self.hub = StateHub()
        self.readiness = Readiness()
        self.loop_monitor = LoopMonitor(self.registry, workers=config.worker_threads)
        self.logs = RecentLogs()  # the last lines and errors, for /debug
        self.dump_providers: dict[str, Callable[[], Any]] = {}
        self._stop = asyncio.Event()
        self._forced = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self.servers: list[AdminServer | StatsServer | ReadinessServer] = []
        self.clock = SystemClock()
        self.rng = random.Random()
        self.local_source: LocalConfigSource | None = None
        self.xds: XdsClient | None = None
        if config.uses_local_xds:
            self.local_source = LocalConfigSource(
                self.hub.apply,
                path=config.local_xds_path,
                inline=config.local_xds if config.local_xds_path is None else None,
                cluster_id=config.cluster_id,
            )
        self._start_identity()
        self.workers: WorkerPool | None = None
        if config.worker_threads > 1:
            self.workers = WorkerPool(
                config=config,
                hub=self.hub,
                secrets=self.secrets,
                readiness=self.readiness,
                own_registry=self.registry,
                levels=self.levels,
                spawn=self.spawn,
            )
        # With workers the connections are theirs: this process's series would only be zeros.
        connection_registry = self.registry if self.workers is None else CollectorRegistry()
        self.telemetry = ProxyTelemetry(
            ConnectionMetrics(connection_registry),
            self.hub.state,
            network=config.network,
            access_log_errors_only=config.access_log_errors_only,
        )
        self.dataplane = DataPlane(
            config=config,
            hub=self.hub,
            certificates=FetchedCertificates(
                self.secrets.fetch_certificate, tls12_enabled=config.tls12_enabled
            ),
            registry=self.registry,
            readiness=self.readiness,
            telemetry=self.telemetry,
            rng=self.rng,
            spawn=self.spawn,
        )
        self.dump_providers["dataPlane"] = self.dataplane.dump
        if self.workers is not None:
            self.dataplane.serve_elsewhere = self.workers.pods_factory
            self.dataplane.connection_views = self.workers.connections
            self.dataplane.pool_views = self.workers.pools
            self.dump_providers["workers"] = self.workers.dump
        self.dump_providers["workloadState"] = self.dataplane.workload_state

    def _start_identity(self) -> None:
        """Certificates for this node's workloads, from istiod's CA, the local CA or FAKE_CA."""
        ca = build_ca_client(self.config, self.clock)  # a bad LOCAL_CA_DIR is fatal here
        roots_created = Counter(
            "ztunnel_py_local_ca_roots_created",
            "Local CA roots this daemon created at start (1 after a lost LOCAL_CA_DIR: peers"
            " that trust the previous root refuse this node)",
            registry=self.registry,
        )
        if isinstance(ca, LocalCaClient) and ca.ca.created:
            roots_created.inc()
        self.secrets = SecretManager(ca, self.clock, self.rng)
        self.node_certs = NodeCertificates(self.secrets, self.hub.state, self.config.node_name)
        self.dump_providers["certificates"] = self.secrets.dump
        self.secrets.add_listener(self._follow_certificates)

        def on_change(changes: ChangeSet) -> None:
            self.node_certs.on_change(changes)
            self._follow_certificates()  # a new identity blocks readiness at once

        self.hub.subscribe("certificates", on_change)

    def _follow_certificates(self) -> None:
        pending = self.secrets.pending()
        if pending:
            names = ", ".join(str(i) for i in pending[:3])
            self.readiness.block(READY_CERTIFICATES, f"waiting for {names}")
        else:
            self.readiness.release(READY_CERTIFICATES)

    # ------------------------------------------------------------------ admin surface

    def dump(self) -> dict[str, Any]:
        out: dict[str, Any] = state_dump(self.hub.state)
        out["version"] = {
            "ztunnelPy": ztunnel_py.__version__,
            "generation": self.hub.state.generation,
        }
        out["config"] = redact(self.config.to_dump())  # e.g. XDS_HEADER_AUTHORIZATION
        if self.local_source is not None:
            out["staticConfig"] = {
                "source": str(self.config.local_xds_path or "LOCAL_XDS"),
                "loads": self.local_source.loads,
                "lastError": self.local_source.last_error,
            }
        for name, provider in sorted(self.dump_providers.items()):
            out[name] = provider()
        return out

    # ------------------------------------------------------------------ lifecycle

    def request_shutdown(self) -> None:
        self._stop.set()

    def force_shutdown(self) -> None:
        self._stop.set()
        self._forced.set()

    def spawn(self, name: str, coro: Coroutine[Any, Any, None]) -> None:
        """Run a long-lived task; if it dies with an error the daemon logs it and drains."""
        task = asyncio.create_task(coro, name=name)
        task.add_done_callback(self._task_done)
        self._tasks.append(task)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            log.error("task %s failed, shutting down", task.get_name(), exc_info=exc)
            self.request_shutdown()

    async def start(self) -> None:
        """Load configuration, then open the admin, metrics and readiness ports."""
        release_state = self.readiness.register(READY_STATE, "waiting for configuration")
        if self.local_source is not None:
            self.local_source.load()  # a bad file at start is fatal, before any port opens
            self.spawn("local-config-watch", self.local_source.watch())
        if self.config.xds_address is None:
            release_state()  # the local config, if any, is all the configuration there is
        else:
            # istiod: ready once every watched type has had an ACKed response. Imported here:
            # grpc and the envoy protos cost ~10 MiB that local mode has no use for.
            from ztunnel_py.xds.client import XdsClient, XdsMetrics

            self.xds = XdsClient(
                self.config, self.hub.apply, XdsMetrics(self.registry), on_ready=release_state
            )
            self.dump_providers["xds"] = self.xds.dump
            self.spawn("xds", self.xds.run())
            if self.config.xds_on_demand:
                self.dataplane.demand = functools.partial(
                    self.xds.fetch_on_demand, timeout=ON_DEMAND_TIMEOUT_S
                )
        self.node_certs.sync_all()
        self._follow_certificates()
        self.dataplane.start()  # eBPF programs, ZDS enrollment, per-pod proxies
        if self.workers is not None and self.dataplane.redirect_mode is not None:
            await self.workers.start(self.dataplane.redirect_mode, self.dataplane.orig_dst_map_fd())
            self.spawn("worker views", self.workers.refresh_views())

        self.spawn("loop monitor", self.loop_monitor.run())
        parts = DaemonParts(
            config=self.config,
            hub=self.hub,
            xds=self.xds,
            local_source=self.local_source,
            secrets=self.secrets,
            dataplane=self.dataplane,
            telemetry=self.telemetry,
            servers=lambda: self.servers,
            logs=self.logs,
            loop_monitor=self.loop_monitor,
        )
        admin = AdminServer(
            debug=DebugViews(debug_providers(parts), logs=self.logs.lines),
            dashboard=lambda: dashboard_facts(parts),
            dump=self.dump,
            levels=self.levels,
            on_quit=self.request_shutdown,
            stats_port=self.config.stats_port,
            ready_port=self.config.readiness_port,
        )
        if self.workers is None:
            stats = StatsServer(self.registry, before_scrape=[self.telemetry.flush])
        else:
            stats = StatsServer(
                self.workers.exposed_registry(), before_scrape=[self.workers.collect]
            )
        ready = ReadinessServer(self.readiness)
        # None makes asyncio bind every family (it would set IPV6_V6ONLY on a "::" socket).
        any_host = None if self.config.ipv6_enabled else "0.0.0.0"
        await admin.start(self.config.admin_port)
        await stats.start(any_host, self.config.stats_port)
        await ready.start(any_host, self.config.readiness_port)
        self.servers = [admin, stats, ready]

    async def run(self) -> int:
        """Run until asked to stop; returns the process exit code."""
        tune_malloc()  # keep socket-sized buffers off mmap (see docs/BENCHMARKS.md)
        loop = asyncio.get_running_loop()
        shutdown = ShutdownController(graceful=self.request_shutdown, force=self.force_shutdown)
        shutdown.install(loop)
        logging.getLogger().addHandler(self.logs)
        try:
            await self.start()
            log.info(
                "ztunnel-py %s running (admin 127.0.0.1:%d, metrics :%d, readiness :%d)",
                ztunnel_py.__version__,
                self.config.admin_port,
                self.config.stats_port,
                self.config.readiness_port,
            )
            await self._stop.wait()
            return await self.shutdown()
        finally:
            ShutdownController.uninstall(loop)
            logging.getLogger().removeHandler(self.logs)

    async def shutdown(self) -> int:
        """Readiness off, listeners closed, connections drained up to the deadline; a second
        signal (``force_shutdown``) cuts the drain short."""
        self.readiness.block("shutdown", "draining")
        deadline = self.config.connection_termination_deadline_s
        log.info("draining (deadline %.1fs)", deadline)
        drained = asyncio.create_task(self.dataplane.stop(deadline))
        forced = asyncio.create_task(self._forced.wait())
        await asyncio.wait({drained, forced}, return_when=asyncio.FIRST_COMPLETED)
        forced.cancel()
        code = EXIT_OK
        if not drained.done():
            drained.cancel()
            code = EXIT_FORCED
        with contextlib.suppress(asyncio.CancelledError):
            await drained
        if self.workers is not None:
            await self.workers.stop(0.0 if code == EXIT_FORCED else deadline)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for server in self.servers:
            await server.http.close()
        await self.secrets.close()
        log.info("ztunnel-py stopped")
        return code
