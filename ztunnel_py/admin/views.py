"""The admin port's ``/debug`` routes: gather the sections, answer in JSON, profile on demand.

What each section contains is decided by its provider (the composition root hands them in);
``admin.debug`` orders, assembles and scrubs them; this module is the HTTP side.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Callable, Mapping
from typing import Any

from ztunnel_py.admin import debug, profiler, stacks
from ztunnel_py.admin.http import Handler, Request, Response

JSON_TYPE = "application/json"
MAX_PROFILE_SECONDS = 300
DEFAULT_PROFILE_SECONDS = 10


def json_response(value: Any, status: int = 200) -> Response:
    return Response(status, (json.dumps(value, indent=2, default=str) + "\n").encode(), JSON_TYPE)


def _error(status: int, message: str) -> Response:
    return json_response({"error": message}, status)


def _int_param(request: Request, name: str, default: int, low: int, high: int) -> int:
    values = request.query.get(name)
    if not values:
        return default
    text = values[-1]
    if not text.isdigit() or not low <= int(text) <= high:
        raise ValueError(f"invalid {name} value {text!r}; expected {low}-{high}")
    return int(text)


class DebugViews:
    def __init__(
        self,
        providers: Mapping[str, Callable[[], Any]],
        *,
        logs: Callable[[], list[dict[str, Any]]],
    ) -> None:
        self._providers = providers
        self._logs = logs
        self._loop_thread = threading.get_ident()  # built on the event loop's thread

    def routes(self) -> dict[str, Handler]:
        routes: dict[str, Handler] = {
            "/debug": self._index,
            "/debug/dump": self._dump,
            "/debug/logs": self._logs_view,
            "/debug/pprof/profile": self._profile,
            "/debug/pprof/heap": self._heap,
        }
        for name in debug.SECTIONS:
            routes[f"/debug/{name}"] = self._section(name)
        return routes

    def sections(self, names: list[str] | None = None) -> dict[str, Any]:
        return debug.gather(self._providers, names)

    async def _index(self, _: Request) -> Response:
        return json_response(debug.index())

    async def _dump(self, request: Request) -> Response:
        try:
            names = debug.parse_sections(request.query.get("section", []))
        except debug.UnknownSection as e:
            return _error(400, str(e))
        return json_response(self.sections(names))

    def _section(self, name: str) -> Handler:
        async def view(_: Request) -> Response:
            return json_response(self.sections([name])[name])

        return view

    async def _logs_view(self, _: Request) -> Response:
        return json_response({"lines": self._logs()})

    async def _profile(self, request: Request) -> Response:
        try:
            seconds = _int_param(
                request, "seconds", DEFAULT_PROFILE_SECONDS, 1, MAX_PROFILE_SECONDS
            )
            interval_ms = _int_param(request, "interval_ms", 5, 1, 1000)
        except ValueError as e:
            return _error(400, str(e))
        fmt = (request.query.get("format") or ["collapsed"])[-1]
        if fmt not in {"collapsed", "speedscope"}:
            return _error(400, f"invalid format {fmt!r}; expected collapsed or speedscope")
        try:
            samples = await asyncio.to_thread(
                profiler.sample_stacks, self._loop_thread, seconds, interval_ms / 1000
            )
        except profiler.ProfilerBusy as e:
            return _error(503, str(e))
        if fmt == "speedscope":
            name = f"ztunnel-py event loop, {seconds}s"
            profile = stacks.speedscope(samples, interval_s=interval_ms / 1000, name=name)
            return json_response(profile)
        return Response(200, stacks.collapsed(samples).encode())

    async def _heap(self, request: Request) -> Response:
        if "stop" in request.query:
            return json_response({"tracing": False, "wasTracing": profiler.stop_heap()})
        try:
            limit = _int_param(request, "limit", 50, 1, 1000)
        except ValueError as e:
            return _error(400, str(e))
        return json_response(await asyncio.to_thread(profiler.heap_top, limit))
