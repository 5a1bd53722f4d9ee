"""``StateHub``: the one place state changes go through, and who hears about them.

Every source (local config, xDS) applies its batches here; followers (BPF reconcile, live
connection re-evaluation, pending pod enrolments, on-demand waiters) subscribe to the
``ChangeSet`` each apply returns. Pure and synchronous: subscribers run in order, right after
the state changed, on the single writer's thread.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from ztunnel_py.state.store import ChangeSet, ProxyState, UpdateBatch

log = logging.getLogger(__name__)

Subscriber = Callable[[ChangeSet], None]


class StateHub:
    def __init__(self, state: ProxyState | None = None) -> None:
        self.state = state or ProxyState()
        self._subscribers: list[tuple[str, Subscriber]] = []

    def subscribe(self, name: str, fn: Subscriber) -> None:
        self._subscribers.append((name, fn))

    def apply(self, batch: UpdateBatch) -> ChangeSet:
        changes = self.state.apply(batch)
        if not changes.is_empty:
            for name, fn in self._subscribers:
                try:
                    fn(changes)
                except Exception:  # one follower's bug must not stop the others or the source
                    log.exception(
                        "state subscriber %s failed on generation %d", name, changes.generation
                    )
        return changes
