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

Outbound connections are tracked too (``outbound``), only to be listed: ``dump()`` is the
``connections`` of ztunnel's ``workloadState`` (per workload uid, ``inbound`` and ``outbound``
with ``src``, ``originalDst``, ``actualDst`` and ``protocol``), which
``istioctl ztunnel-config connections`` prints.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from ztunnel_py.hbone.headers import format_authority
from ztunnel_py.rbac.evaluate import ConnectionInfo, Decision, evaluate
from ztunnel_py.state.model import IPAddress, Workload
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
    dest_service: str | None = None  # the service hostname the client asked for, if any


@dataclass(frozen=True, slots=True)
class OutboundConnection:
    """One live outbound connection of a pod, as ztunnel lists it."""

    workload_uid: str  # the pod's (source) workload
    src: tuple[IPAddress, int]
    original_dst: tuple[IPAddress, int]  # where the application connected
    actual_dst: tuple[IPAddress, int]  # where we connected (``ip:15008`` when tunnelled)
    protocol: str  # HBONE or TCP


class ConnectionTracker:
    def __init__(self) -> None:
        self._live: dict[int, TrackedConnection] = {}
        self._outbound: dict[int, OutboundConnection] = {}
        self._ids = itertools.count(1)

    def register(
        self,
        conn: ConnectionInfo,
        dst_workload_uid: str,
        close: Callable[[str], None],
        *,
        workload: Workload | None = None,
        dest_service: str | None = None,
    ) -> TrackedConnection:
        handle = TrackedConnection(
            conn, dst_workload_uid, close, next(self._ids), workload, dest_service
        )
        self._live[handle.id] = handle
        return handle

    @contextlib.contextmanager
    def outbound(self, connection: OutboundConnection) -> Iterator[None]:
        """List ``connection`` while inside (outbound connections are never re-authorized)."""
        key = next(self._ids)
        self._outbound[key] = connection
        try:
            yield
        finally:
            del self._outbound[key]

    def outbound_connections(self) -> list[OutboundConnection]:
        return list(self._outbound.values())

    def dump(self) -> dict[str, dict[str, list[dict[str, Any]]]]:
        """workload uid -> ``{"inbound": [...], "outbound": [...]}`` in ztunnel's shape, sorted."""
        out: dict[str, dict[str, list[dict[str, Any]]]] = {}

        def entry(uid: str) -> dict[str, list[dict[str, Any]]]:
            return out.setdefault(uid, {"inbound": [], "outbound": []})

        for h in self._live.values():
            c = h.conn
            entry(h.dst_workload_uid)["inbound"].append(
                {
                    "src": format_authority(c.src_ip, c.src_port),
                    "originalDst": h.dest_service,
                    "actualDst": format_authority(c.dst_ip, c.dst_port),
                    # ztunnel: a verified peer identity means it came through the tunnel
                    "protocol": "HBONE" if c.src_identity is not None else "TCP",
                }
            )
        for o in self._outbound.values():
            entry(o.workload_uid)["outbound"].append(
                {
                    "src": format_authority(*o.src),
                    "originalDst": format_authority(*o.original_dst),
                    "actualDst": format_authority(*o.actual_dst),
                    "protocol": o.protocol,
                }
            )
        for lists in out.values():
            for conns in lists.values():
                conns.sort(key=lambda d: (d["src"], d["actualDst"]))
        return out

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
    *,
    dest_service: str | None = None,
) -> Iterator[None]:
    """Re-authorize ``conn`` on every policy change while inside; ``close`` it when denied.

    Without a tracker (tests, or nothing re-checks policies) the connection is not watched.
    """
    if tracker is None:
        yield
        return
    handle = tracker.register(
        conn, workload.uid, close, workload=workload, dest_service=dest_service
    )
    try:
        yield
    finally:
        tracker.unregister(handle)


@contextlib.contextmanager
def tracked_outbound(
    tracker: ConnectionTracker | None, connection: OutboundConnection
) -> Iterator[None]:
    """List an outbound connection while inside (nothing without a tracker)."""
    if tracker is None:
        yield
        return
    with tracker.outbound(connection):
        yield
