"""Graceful drain: stop taking new work, let live connections finish, then force them closed.

One ``Drain`` per daemon. Servers check ``draining`` before accepting, and hold a ``track()``
token per live connection with a callback that force-closes it. ``run(deadline)`` waits until
nothing is tracked or the deadline passes (``CONNECTION_TERMINATION_DEADLINE``), then closes
what is left.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Callable

log = logging.getLogger(__name__)


class Drain:
    def __init__(self) -> None:
        self.started = asyncio.Event()
        self._live: dict[int, Callable[[], None]] = {}
        self._idle = asyncio.Event()
        self._idle.set()
        self._ids = itertools.count()

    @property
    def draining(self) -> bool:
        return self.started.is_set()

    def track(self, force_close: Callable[[], None]) -> Callable[[], None]:
        """Register a live connection; call the returned function when it ends."""
        token = next(self._ids)
        self._live[token] = force_close
        self._idle.clear()

        def done() -> None:
            self._live.pop(token, None)
            if not self._live:
                self._idle.set()

        return done

    @property
    def live(self) -> int:
        return len(self._live)

    def start(self) -> None:
        self.started.set()

    async def run(self, deadline_s: float) -> bool:
        """Start draining and wait; returns True if everything finished before the deadline."""
        self.start()
        try:
            await asyncio.wait_for(self._idle.wait(), timeout=deadline_s)
            return True
        except TimeoutError:
            left = list(self._live.values())
            log.warning(
                "drain deadline (%.1fs) passed, closing %d connections", deadline_s, len(left)
            )
            for close in left:
                close()
            return False
