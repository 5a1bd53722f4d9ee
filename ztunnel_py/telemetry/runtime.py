"""The event loop's health, as ztunnel's ``tokio_*`` runtime metrics show its runtime's.

``LoopMonitor`` wakes every ``interval_s`` and measures how late it woke: that lag is how long
every connection of the daemon waited for the loop at that moment (a slow callback, a blocking
call, too much work). It exports:

* ``tokio_num_workers`` (the data-plane worker processes, ``ZTUNNEL_WORKER_THREADS``; 1 when
  the daemon serves alone) and ``tokio_num_alive_tasks`` (asyncio tasks
  alive), ztunnel's names for the same facts;
* ``ztunnel_py_event_loop_lag_seconds``, a histogram of the measured lags (no tokio
  counterpart: tokio reports busy time per worker instead).

``RecentLogs`` is a logging handler that keeps the last lines, and the last warnings and
errors apart, for the debug views: an operator sees what went wrong without the log stream.
"""

from __future__ import annotations

import asyncio
import collections
import datetime
import logging
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Gauge, Histogram

LAG_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class LoopMonitor:
    def __init__(
        self,
        registry: CollectorRegistry | None,
        *,
        interval_s: float = 0.5,
        clock: Callable[[], float] | None = None,
        workers: int = 1,
    ) -> None:
        self.interval_s = interval_s
        self._clock = clock
        self.last_lag_s = 0.0
        self.max_lag_s = 0.0
        self.samples = 0
        self._histogram: Histogram | None = None
        if registry is not None:
            Gauge(
                "tokio_num_workers",
                "the number of worker threads used by the runtime",
                registry=registry,
            ).set(workers)  # data-plane worker processes (ZTUNNEL_WORKER_THREADS)
            Gauge(
                "tokio_num_alive_tasks",
                "the number of alive tasks in the runtime",
                registry=registry,
            ).set_function(self.alive_tasks)
            self._histogram = Histogram(
                "ztunnel_py_event_loop_lag_seconds",
                "How late the event loop ran a timer (how long every connection waited)",
                buckets=LAG_BUCKETS,
                registry=registry,
            )
        self._loop: asyncio.AbstractEventLoop | None = None

    def alive_tasks(self) -> int:
        loop = self._loop
        return len(asyncio.all_tasks(loop)) if loop is not None and loop.is_running() else 0

    async def run(self) -> None:
        loop = self._loop = asyncio.get_running_loop()
        clock = self._clock or loop.time
        while True:
            expected = clock() + self.interval_s
            await asyncio.sleep(self.interval_s)
            self.record(max(0.0, clock() - expected))

    def record(self, lag_s: float) -> None:
        self.last_lag_s = lag_s
        self.max_lag_s = max(self.max_lag_s, lag_s)
        self.samples += 1
        if self._histogram is not None:
            self._histogram.observe(lag_s)

    def dump(self) -> dict[str, Any]:
        return {
            "workers": 1,
            "aliveTasks": self.alive_tasks(),
            "loopLagSeconds": {
                "last": round(self.last_lag_s, 6),
                "max": round(self.max_lag_s, 6),
                "samples": self.samples,
                "intervalSeconds": self.interval_s,
            },
        }


class RecentLogs(logging.Handler):
    """The last log records (INFO and up) and, apart, the last warnings and errors; bounded,
    old ones fall off. The debug views and ``ztunnel-py debug bundle`` read them."""

    def __init__(self, *, lines: int = 1000, errors: int = 100) -> None:
        super().__init__(logging.INFO)
        self._lines: collections.deque[dict[str, Any]] = collections.deque(maxlen=lines)
        self._errors: collections.deque[dict[str, Any]] = collections.deque(maxlen=errors)
        self.errors_total = 0

    def emit(self, record: logging.LogRecord) -> None:
        try:
            fields = getattr(record, "fields", None) or {}
            entry: dict[str, Any] = {
                "time": datetime.datetime.fromtimestamp(record.created, tz=datetime.UTC)
                .isoformat(timespec="milliseconds")
                .replace("+00:00", "Z"),
                "level": record.levelname.lower(),
                "scope": record.name,
                "message": record.getMessage(),
            }
            if fields:
                entry["fields"] = {k: str(v) for k, v in fields.items()}
            if record.exc_info and record.exc_info[1] is not None:
                entry["exception"] = repr(record.exc_info[1])
            self._lines.append(entry)
            if record.levelno >= logging.WARNING:
                self._errors.append(entry)
                self.errors_total += 1
        except Exception:  # noqa: BLE001 (logging must never raise into the caller)
            self.handleError(record)

    def errors(self) -> dict[str, Any]:
        return {"total": self.errors_total, "recent": list(self._errors)}

    def lines(self) -> list[dict[str, Any]]:
        return list(self._lines)
