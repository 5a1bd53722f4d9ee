"""Readiness as ztunnel does it: named tasks that each must finish before ``/healthz/ready`` is 200.

Each subsystem registers a task (``state manager`` for the first xDS sync, ``certificates``
for prefetched certificates, ``workload proxy manager`` for the ZDS snapshot, ``proxy`` for
listeners) and releases it once; the probe answers 503 with the pending names until then.
A task can also be re-blocked (the CA going away makes certificates pending again).
"""

from __future__ import annotations

import functools
from collections.abc import Callable


class Readiness:
    def __init__(self) -> None:
        self._pending: dict[str, str] = {}  # task name -> why it is pending

    def register(self, name: str, why: str = "") -> Callable[[], None]:
        """Block readiness on ``name``; call the returned function to release it."""
        self.block(name, why)
        return functools.partial(self.release, name)

    def block(self, name: str, why: str = "") -> None:
        self._pending[name] = why

    def release(self, name: str) -> None:
        self._pending.pop(name, None)

    @property
    def ready(self) -> bool:
        return not self._pending

    def pending(self) -> list[str]:
        return [f"{name} ({why})" if why else name for name, why in sorted(self._pending.items())]
