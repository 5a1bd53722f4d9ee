"""Live inbound connections, re-authorized whenever policies change.

ztunnel checks authorization once at connection setup, and then again for every tracked
connection on every policy update, closing those now denied with "connection closed due to
policy change" (``PolicyWatcher``). This registry is that second half. It is pure: the proxy
registers each authorized inbound connection with a ``close`` callback (which typically
cancels the connection's task), and the state-update path calls ``on_policy_change`` with the
store after applying a batch whose ``ChangeSet.policies_changed``.

The destination workload is looked up by uid at re-evaluation time, so a change to its
``authorization_policies`` (selector policies) counts too. When it has left the state, the
last copy seen (or the one given to ``register``) stands in, as ztunnel keeps the workload it
authorized against; a connection with no copy at all is left alone.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from ztunnel_py.rbac.evaluate import ConnectionInfo, Decision, evaluate
from ztunnel_py.state.model import Workload
from ztunnel_py.state.store import ProxyState

POLICY_CHANGE_ERROR = "connection closed due to policy change"

_LOG = logging.getLogger(__name__)


@dataclass(eq=False, slots=True)
class TrackedConnection:
    """The handle ``register`` returns; compare by identity."""

    conn: ConnectionInfo
    dst_workload_uid: str
    close: Callable[[str], None] = field(repr=False)
    id: int = 0
    workload: Workload | None = field(default=None, repr=False)  # last copy seen


class ConnectionTracker:
    def __init__(self) -> None:
        self._live: dict[int, TrackedConnection] = {}
        self._ids = itertools.count(1)

    def register(
        self,
        conn: ConnectionInfo,
        dst_workload_uid: str,
        close: Callable[[str], None],
        *,
        workload: Workload | None = None,
    ) -> TrackedConnection:
        handle = TrackedConnection(conn, dst_workload_uid, close, next(self._ids), workload)
        self._live[handle.id] = handle
        return handle

    def unregister(self, handle: TrackedConnection) -> None:
        """Forget a connection (it ended); unknown or already closed handles are fine."""
        self._live.pop(handle.id, None)

    def __len__(self) -> int:
        return len(self._live)

    def __iter__(self) -> Iterator[TrackedConnection]:
        return iter(list(self._live.values()))

    def __contains__(self, handle: object) -> bool:
        return isinstance(handle, TrackedConnection) and self._live.get(handle.id) is handle

    def on_policy_change(self, state: ProxyState) -> list[TrackedConnection]:
        """Re-evaluate every tracked connection; close and forget the ones now denied."""
        closed: list[TrackedConnection] = []
        for handle in list(self._live.values()):
            decision = self._reevaluate(handle, state)
            if decision is None or decision.allowed:
                continue
            # Forget it first, so a close callback that unregisters (or raises) is harmless.
            self._live.pop(handle.id, None)
            closed.append(handle)
            _LOG.info(
                "connection %s closed because it's no longer allowed after a policy update",
                handle.conn,
                extra={"fields": {"reason": decision.reason}},
            )
            try:
                handle.close(POLICY_CHANGE_ERROR)
            except Exception:  # noqa: BLE001 (one broken callback must not keep others open)
                _LOG.exception("closing connection %s after a policy change failed", handle.conn)
        return closed

    @staticmethod
    def _reevaluate(handle: TrackedConnection, state: ProxyState) -> Decision | None:
        workload = state.workload(handle.dst_workload_uid) or handle.workload
        if workload is None:
            return None
        handle.workload = workload
        return evaluate(handle.conn, state.policies_for(workload))


@contextlib.contextmanager
def tracked(
    tracker: ConnectionTracker | None,
    conn: ConnectionInfo,
    workload: Workload,
    close: Callable[[str], None],
) -> Iterator[None]:
    """Re-authorize ``conn`` on every policy change while inside; ``close`` it when denied.

    Without a tracker (tests, or nothing re-checks policies) the connection is not watched.
    """
    if tracker is None:
        yield
        return
    handle = tracker.register(conn, workload.uid, close, workload=workload)
    try:
        yield
    finally:
        tracker.unregister(handle)
