"""The three small HTTP surfaces: admin (127.0.0.1:15000), metrics (:15020), readiness (:15021).

Admin is bound to localhost only (127.0.0.1 and ::1), always, as ztunnel's: it can
reconfigure logging and stop the daemon. Metrics and readiness listen on all addresses for
Prometheus and kubelet.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Gauge, ProcessCollector, disable_created_metrics
from prometheus_client import exposition as prom_exposition
from prometheus_client.openmetrics import exposition as om_exposition

import ztunnel_py
from ztunnel_py.admin import dashboard
from ztunnel_py.admin.http import HttpServer, Request, Response
from ztunnel_py.admin.views import DebugViews
from ztunnel_py.readiness import Readiness
from ztunnel_py.telemetry.logging import LevelController

log = logging.getLogger(__name__)

ADMIN_HOSTS = ("127.0.0.1", "::1")


def new_registry() -> CollectorRegistry:
    """A daemon's own metrics registry (never the global default, so tests can run several)."""
    # ztunnel exposes no ``*_created`` series; neither do we (a process-wide switch).
    disable_created_metrics()  # type: ignore[no-untyped-call]
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    build = Gauge(
        "istio_build", "Istio component build info", ["component", "tag"], registry=registry
    )
    build.labels(component="ztunnel", tag=f"ztunnel-py-{ztunnel_py.__version__}").set(1)
    return registry


class AdminServer:
    def __init__(
        self,
        *,
        debug: DebugViews | None = None,
        dashboard: Callable[[], dict[str, Any]] | None = None,
        dump: Callable[[], dict[str, Any]],
        levels: LevelController,
        on_quit: Callable[[], None],
        stats_port: int,
        ready_port: int,
    ) -> None:
        self._dump = dump
        self._levels = levels
        self._on_quit = on_quit
        self._dashboard = dashboard or (lambda: {})
        self._ports = {"stats_port": stats_port, "ready_port": ready_port}
        self.http = HttpServer(
            "admin",
            {
                "/": self._index_page,
                "/config_dump": self._config_dump,
                "/logging": self._logging,
                "/quitquitquit": self._quit,
                **(debug.routes() if debug is not None else {}),
            },
        )

    async def start(self, port: int) -> None:
        await self.http.start(ADMIN_HOSTS, port)

    async def _index_page(self, _: Request) -> Response:
        page = dashboard.render(
            version=ztunnel_py.__version__, facts=self._dashboard(), **self._ports
        )
        return Response(200, page.encode(), "text/html; charset=utf-8")

    async def _config_dump(self, _: Request) -> Response:
        body = json.dumps(self._dump(), indent=2, sort_keys=False) + "\n"
        return Response(200, body.encode(), "application/json")

    async def _logging(self, request: Request) -> Response:
        if request.method != "POST":
            return Response.text(405, "use POST /logging (optionally ?level=... or ?reset)\n")
        if "reset" in request.query:
            self._levels.reset()
        elif "level" in request.query:
            spec = request.query["level"][-1]
            try:
                self._levels.apply(spec)
            except ValueError as e:
                return Response.text(400, f"{e}\n")
            log.info("log level changed to %s", self._levels.describe())
        return Response.text(200, f"current log level is {self._levels.describe()}\n")

    async def _quit(self, request: Request) -> Response:
        if request.method != "POST":
            return Response.text(405, "use POST /quitquitquit\n")
        log.info("shutdown requested through /quitquitquit")
        self._on_quit()
        return Response.text(200, "draining and exiting\n")


class StatsServer:
    def __init__(
        self,
        registry: CollectorRegistry,
        *,
        before_scrape: Sequence[Callable[[], Awaitable[None] | None]] = (),
    ) -> None:
        self._registry = registry
        self._before_scrape = tuple(before_scrape)  # e.g. bring live byte counters up to date
        self.http = HttpServer(
            "metrics", {"/metrics": self._metrics, "/stats/prometheus": self._metrics}
        )

    async def start(self, host: str | None, port: int) -> None:
        await self.http.start(host, port)

    async def _metrics(self, request: Request) -> Response:
        for refresh in self._before_scrape:
            pending = refresh()
            if pending is not None:
                await pending  # e.g. ask the data-plane workers for their figures
        if "application/openmetrics-text" in request.headers.get("accept", ""):
            return Response(
                200,
                om_exposition.generate_latest(self._registry),  # type: ignore[no-untyped-call]
                om_exposition.CONTENT_TYPE_LATEST,
            )
        return Response(
            200,
            prom_exposition.generate_latest(self._registry),
            prom_exposition.CONTENT_TYPE_LATEST,
        )


class ReadinessServer:
    def __init__(self, readiness: Readiness) -> None:
        self._readiness = readiness
        self.http = HttpServer("readiness", {"/healthz/ready": self._ready})

    async def start(self, host: str | None, port: int) -> None:
        await self.http.start(host, port)

    async def _ready(self, _: Request) -> Response:
        if self._readiness.ready:
            return Response.text(200, "ready\n")
        return Response.text(
            503, "not ready, pending: " + ", ".join(self._readiness.pending()) + "\n"
        )
