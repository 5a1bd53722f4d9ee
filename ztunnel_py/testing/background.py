"""An asyncio loop on a background thread, for fakes (istiod, istio-cni agent) that must keep
serving while a test drives daemon *processes* with blocking calls."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

_T = TypeVar("_T")


class BackgroundLoop:
    def __init__(self, name: str = "background-loop") -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=name, daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, _T], timeout: float = 60) -> _T:
        """Run a coroutine on the loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def call(self, fn: Callable[[], _T], timeout: float = 60) -> _T:
        """Run a plain function on the loop's thread (fakes are not thread-safe)."""
        future: concurrent.futures.Future[_T] = concurrent.futures.Future()

        def invoke() -> None:
            try:
                future.set_result(fn())
            except Exception as e:  # noqa: BLE001 (handed back to the calling thread)
                future.set_exception(e)

        self._loop.call_soon_threadsafe(invoke)
        return future.result(timeout)

    def close(self) -> None:
        """Cancel what is left on the loop, stop it and join the thread."""
        if self._loop.is_closed():
            return

        async def cancel_leftovers() -> None:
            current = asyncio.current_task()
            tasks = [t for t in asyncio.all_tasks() if t is not current]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        self.run(cancel_leftovers())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()
