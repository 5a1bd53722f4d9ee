"""The clock the identity code reads: monotonic time for timers, wall time for certificates.

Certificates carry wall-clock validity, timers need monotonic time, and tests need to move both
by hand (``ztunnel_py.testing.clock.FakeClock``). Code takes a ``Clock`` instead of calling
``time`` or ``asyncio.sleep`` directly.
"""

from __future__ import annotations

import asyncio
import time
from typing import Protocol


class Clock(Protocol):
    def monotonic(self) -> float:
        """Seconds on a clock that never goes back (for timers)."""
        ...

    def wall(self) -> float:
        """Seconds since the Unix epoch (for certificate validity)."""
        ...

    async def sleep_until(self, deadline: float) -> None:
        """Wait until ``monotonic()`` reaches ``deadline``.

        An absolute deadline, not a delay: a clock moved between computing and starting the
        wait (as tests do) cannot stretch it.
        """
        ...


class SystemClock:
    """The real clocks and ``asyncio.sleep``."""

    def monotonic(self) -> float:
        return time.monotonic()

    def wall(self) -> float:
        return time.time()

    async def sleep_until(self, deadline: float) -> None:
        await asyncio.sleep(max(deadline - time.monotonic(), 0.0))
