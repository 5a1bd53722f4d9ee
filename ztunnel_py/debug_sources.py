"""Where each ``/debug`` section comes from in a running daemon (part of the composition root).

``debug_providers(parts)`` maps every section of ``admin.debug.SECTIONS`` to a function that
reads it from the live parts the daemon hands over (``DaemonParts``): no section keeps its own
copy of anything. The values are plain JSON; ``admin.debug`` scrubs secrets from them whatever
they hold.
"""

from __future__ import annotations

import datetime
import gc
import os
import platform
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import ztunnel_py
from ztunnel_py.admin.debug import certificate_summary
from ztunnel_py.admin.dump import policy_to_dict

if TYPE_CHECKING:
    from ztunnel_py.admin.server import AdminServer, ReadinessServer, StatsServer
    from ztunnel_py.config import Config
    from ztunnel_py.dataplane import DataPlane
    from ztunnel_py.identity.manager import SecretManager
    from ztunnel_py.state.hub import StateHub
    from ztunnel_py.telemetry.runtime import LoopMonitor, RecentLogs
    from ztunnel_py.telemetry.sink import ProxyTelemetry
    from ztunnel_py.xds.client import XdsClient
    from ztunnel_py.xds.local_source import LocalConfigSource


@dataclass(frozen=True)
class DaemonParts:
    config: Config
    hub: StateHub
    xds: XdsClient | None
    local_source: LocalConfigSource | None
    secrets: SecretManager
    dataplane: DataPlane
    telemetry: ProxyTelemetry
    servers: Callable[[], Sequence[AdminServer | StatsServer | ReadinessServer]]
    logs: RecentLogs
    loop_monitor: LoopMonitor


_STARTED_WALL = time.time()
_STARTED = time.monotonic()


def debug_providers(app: DaemonParts) -> dict[str, Callable[[], Any]]:
    return {
        "build": _build,
        "config": app.config.to_dump,
        "xds": lambda: _xds(app),
        "certificates": lambda: _certificates(app),
        "pods": app.dataplane.debug_pods,
        "listeners": lambda: _listeners(app),
        "connections": lambda: {
            **app.dataplane.debug_connections(),
            "traffic": app.telemetry.dump(),
        },
        "bpf": app.dataplane.debug_bpf,
        "redirect": app.dataplane.debug_redirect,
        "errors": app.logs.errors,
        "runtime": lambda: _runtime(app),
    }


def dashboard_facts(app: DaemonParts) -> dict[str, Any]:
    """What ``/`` shows: this node's pods, their live connections, the policies."""
    return {
        "node": app.config.node_name or "",
        "pods": app.dataplane.debug_pods(),
        "connections": app.dataplane.conntrack.dump(),
        "policies": [
            policy_to_dict(p) for p in sorted(app.hub.state.policies(), key=lambda p: p.key)
        ],
    }


def _build() -> dict[str, Any]:
    loop_impl = "uvloop" if "uvloop" in sys.modules else "asyncio"
    return {
        "version": ztunnel_py.__version__,
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "eventLoop": loop_impl,
        "platform": platform.platform(),
        "pid": os.getpid(),
        "started": datetime.datetime.fromtimestamp(_STARTED_WALL, tz=datetime.UTC).isoformat(),
        "uptimeSeconds": round(time.monotonic() - _STARTED, 3),
    }


def _xds(app: DaemonParts) -> dict[str, Any]:
    out: dict[str, Any] = {"source": "istiod" if app.xds is not None else "local"}
    if app.xds is not None:
        out.update(app.xds.dump())
    if app.local_source is not None:
        out["localConfig"] = {
            "path": str(app.config.local_xds_path or "LOCAL_XDS"),
            "loads": app.local_source.loads,
            "lastError": app.local_source.last_error,
        }
    out["stateGeneration"] = app.hub.state.generation
    return out


def _certificates(app: DaemonParts) -> dict[str, Any]:
    return {
        "certificates": certificate_summary(app.secrets.dump()),
        "rotation": app.secrets.schedule(),
        "pending": [str(i) for i in app.secrets.pending()],
    }


def _listeners(app: DaemonParts) -> dict[str, Any]:
    servers = [
        {
            "name": s.http.name,
            "addresses": s.http.addresses,
            "openConnections": s.http.open_connections,
            "refusedConnections": s.http.refused_connections,
        }
        for s in app.servers()
    ]
    return {"daemon": servers, "pods": app.dataplane.debug_listeners()}


def _runtime(app: DaemonParts) -> dict[str, Any]:
    out: dict[str, Any] = app.loop_monitor.dump()
    out["threads"] = threading.active_count()
    out["gc"] = {"counts": list(gc.get_count()), "objects": len(gc.get_objects())}
    try:
        with open("/proc/self/statm") as f:
            pages = [int(x) for x in f.read().split()[:2]]
        page = os.sysconf("SC_PAGE_SIZE")
        out["memory"] = {"virtualBytes": pages[0] * page, "residentBytes": pages[1] * page}
    except OSError:
        out["memory"] = None
    try:
        out["openFds"] = len(os.listdir("/proc/self/fd"))
    except OSError:
        out["openFds"] = None
    return out
