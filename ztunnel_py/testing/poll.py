"""Waiting in tests for what another task, thread or process does: poll until it holds.

The bound only turns a hang into a readable failure; it is never a performance expectation.
Two shapes of check:

- a condition (``wait_until``, ``wait_until_async``): true once it holds. An
  ``AssertionError`` raised inside it counts as "not yet" too;
- an assert-style check (``eventually``): holds once it returns without ``AssertionError``;
  after the bound the last ``AssertionError`` is raised, so the failure shows what differed.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TypeVar

_T = TypeVar("_T")

HANG_GUARD_S = 30.0


def _holds(condition: Callable[[], object]) -> bool:
    try:
        return bool(condition())
    except AssertionError:
        return False


def wait_until(
    condition: Callable[[], object],
    what: str,
    *,
    timeout: float = HANG_GUARD_S,
    interval: float = 0.05,
) -> None:
    """Poll ``condition`` until it is true; ``AssertionError`` naming ``what`` on a hang."""
    deadline = time.monotonic() + timeout
    while not _holds(condition):
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(interval)


async def wait_until_async(
    condition: Callable[[], object], what: str, *, interval: float = 0.01
) -> None:
    """``wait_until`` on the running loop: other tasks run between the polls."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + HANG_GUARD_S
    while not _holds(condition):
        if loop.time() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        await asyncio.sleep(interval)


def eventually(
    check: Callable[[], _T], *, timeout: float = HANG_GUARD_S, interval: float = 0.05
) -> _T:
    """Call the assert-style ``check`` until it passes; returns what it returned."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return check()
        except AssertionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(interval)
