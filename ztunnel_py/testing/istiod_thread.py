"""A fake istiod (ADS + CA on one TLS port) on a background thread, for tests that drive a
daemon *process*: the test's own thread may block while the fake keeps serving."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from ztunnel_py.testing.ca import FakeCa
from ztunnel_py.testing.istiod import FakeIstiod
from ztunnel_py.testing.pki import CertificateAuthority

_T = TypeVar("_T")


class BackgroundIstiod:
    def __init__(self, *, config_yaml: str, token: str | None = None) -> None:
        self.authority = CertificateAuthority.create(common_name="fake istiod mesh root")
        self.ca = FakeCa(self.authority, required_token=token)
        self._config_yaml = config_yaml
        self._token = token
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="fake-istiod", daemon=True
        )
        self.istiod: FakeIstiod | None = None

    def __enter__(self) -> BackgroundIstiod:
        self._thread.start()

        async def start() -> FakeIstiod:
            istiod = FakeIstiod(
                config_yaml=self._config_yaml,
                token=self._token,
                authority=self.authority,
                extra_servicers=[self.ca.add_to_server],
            )
            await istiod.start()
            return istiod

        self.istiod = self.run(start())
        return self

    def __exit__(self, *exc: object) -> None:
        if self.istiod is not None:
            self.run(self.istiod.stop())

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

    @property
    def address(self) -> str:
        assert self.istiod is not None
        return self.istiod.address

    @property
    def root_pem(self) -> bytes:
        return self.authority.root_pem

    def run(self, coro: Coroutine[Any, Any, _T], timeout: float = 30) -> _T:
        """Run a coroutine on the fake's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def call(self, fn: Callable[[], _T], timeout: float = 30) -> _T:
        """Run a plain function (``istiod.push(...)``) on the fake's loop thread."""
        future: concurrent.futures.Future[_T] = concurrent.futures.Future()

        def invoke() -> None:
            try:
                future.set_result(fn())
            except Exception as e:  # noqa: BLE001 (handed back to the calling thread)
                future.set_exception(e)

        self._loop.call_soon_threadsafe(invoke)
        return future.result(timeout)
