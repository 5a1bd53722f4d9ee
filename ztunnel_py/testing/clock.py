"""A clock that tests move by hand: ``monotonic()``, ``wall()``, and ``sleep()``/``sleep_until()``
that wake on ``advance()``.

It satisfies ``ztunnel_py.identity.clock.Clock``. Sleepers are woken in deadline order when
``advance`` moves time past their deadline; the woken tasks run the next time the test yields to
the event loop (``await asyncio.sleep(0)`` or awaiting something else).
"""

from __future__ import annotations

import asyncio
import heapq
import itertools

# 2023-11-14T22:13:20Z: a fixed, recognisable wall time so that dumps are reproducible.
DEFAULT_WALL_EPOCH = 1_700_000_000.0


class FakeClock:
    def __init__(self, *, wall_epoch: float = DEFAULT_WALL_EPOCH, monotonic_start: float = 1000.0):
        self._mono = monotonic_start
        self._wall_offset = wall_epoch - monotonic_start
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._seq = itertools.count()

    def monotonic(self) -> float:
        return self._mono

    def wall(self) -> float:
        """Seconds since the Unix epoch, moving together with ``monotonic()``."""
        return self._mono + self._wall_offset

    async def sleep(self, seconds: float) -> None:
        await self.sleep_until(self._mono + seconds)

    async def sleep_until(self, deadline: float) -> None:
        if deadline <= self._mono:
            await asyncio.sleep(0)
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (deadline, next(self._seq), fut))
        await fut

    def advance(self, seconds: float) -> None:
        """Move both clocks forward and wake every sleeper whose deadline has come."""
        if seconds < 0:
            raise ValueError("a clock only moves forward")
        self._mono += seconds
        while self._sleepers and self._sleepers[0][0] <= self._mono:
            _, _, fut = heapq.heappop(self._sleepers)
            if not fut.done():
                fut.set_result(None)

    def jump_wall(self, seconds: float) -> None:
        """Step the wall clock alone, either way (NTP correction, VM resume): the monotonic
        clock and the sleepers do not notice."""
        self._wall_offset += seconds

    @property
    def sleepers(self) -> int:
        """How many sleeps are pending (cancelled ones excluded)."""
        return sum(1 for _, _, fut in self._sleepers if not fut.done())

    def next_deadline(self) -> float | None:
        """The monotonic time of the earliest pending sleep, or ``None``."""
        live = [deadline for deadline, _, fut in self._sleepers if not fut.done()]
        return min(live) if live else None
