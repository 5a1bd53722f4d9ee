"""SIGTERM/SIGINT handling: the first signal drains gracefully, a second one forces the exit."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable

log = logging.getLogger(__name__)


class ShutdownController:
    def __init__(self, *, graceful: Callable[[], None], force: Callable[[], None]) -> None:
        self._graceful = graceful
        self._force = force
        self.signals = 0

    def on_signal(self, signum: int) -> None:
        self.signals += 1
        name = signal.Signals(signum).name
        if self.signals == 1:
            log.info("received %s, draining (send it again to exit at once)", name)
            self._graceful()
        else:
            log.warning("received %s again, exiting without waiting for connections", name)
            self._force()

    def install(self, loop: asyncio.AbstractEventLoop) -> None:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self.on_signal, signum)

    @staticmethod
    def uninstall(loop: asyncio.AbstractEventLoop) -> None:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
