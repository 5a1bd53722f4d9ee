"""Log lines a peer can trigger at will, limited so an attack cannot fill the disk.

``LimitedLog`` lets through at most ``burst`` lines per key in each ``interval_s``; the rest
are counted and the next line let through says how many were left out. Keys are a small
fixed set chosen by the caller (a kind of event, never a peer's address), so the table stays
small; it is cleared should it ever grow past ``MAX_KEYS``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

DEFAULT_INTERVAL_S = 10.0
DEFAULT_BURST = 5
MAX_KEYS = 256


@dataclass(slots=True)
class _Window:
    start: float
    logged: int = 0
    suppressed: int = 0


class LimitedLog:
    def __init__(
        self,
        logger: logging.Logger,
        *,
        interval_s: float = DEFAULT_INTERVAL_S,
        burst: int = DEFAULT_BURST,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.logger = logger
        self.interval_s = interval_s
        self.burst = burst
        self._clock = clock
        self._windows: dict[str, _Window] = {}

    def log(self, level: int, key: str, msg: str, *args: object) -> bool:
        """Log ``msg % args`` unless ``key`` used up its burst; returns whether it was logged."""
        if not self.logger.isEnabledFor(level):
            return False
        now = self._clock()
        window = self._windows.get(key)
        if window is None or now - window.start >= self.interval_s:
            if len(self._windows) >= MAX_KEYS:
                self._windows.clear()
            suppressed = window.suppressed if window is not None else 0
            window = self._windows[key] = _Window(now, suppressed=suppressed)
        if window.logged >= self.burst:
            window.suppressed += 1
            return False
        window.logged += 1
        if window.suppressed:
            msg = f"{msg} (%d similar lines suppressed)"
            args = (*args, window.suppressed)
            window.suppressed = 0
        self.logger.log(level, msg, *args)
        return True

    def warning(self, key: str, msg: str, *args: object) -> bool:
        return self.log(logging.WARNING, key, msg, *args)

    def info(self, key: str, msg: str, *args: object) -> bool:
        return self.log(logging.INFO, key, msg, *args)
