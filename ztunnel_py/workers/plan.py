"""The pure core of multi-worker mode: worker bookkeeping, state batches, merged views.

No I/O: the supervisor asks this module what to do and does it.

- ``WorkerTable``: which worker holds which slot, which are starting, serving or draining,
  and what to do when one exits (replace it, after a backoff when it died before serving);
- ``snapshot`` / ``batch_for``: the whole state, or one ``ChangeSet`` of it, as the
  ``UpdateBatch`` a worker applies to its own copy;
- ``merge_families`` / ``retired_counts`` / ``merge_connections``: every worker's metrics and
  live connections seen as one daemon's (same names and labels, values summed; counters of
  workers that are gone stay counted, so totals never go backwards).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.metrics_core import Metric

from ztunnel_py.state.store import ChangeSet, ProxyState, UpdateBatch

RESTART_BACKOFF_S = 0.5  # first retry of a worker that died before serving; doubles
RESTART_BACKOFF_MAX_S = 30.0
CUMULATIVE_TYPES = frozenset({"counter", "histogram", "summary"})


class WorkerState(enum.Enum):
    STARTING = "starting"  # spawned, given the state and the pods, not yet ready
    SERVING = "serving"
    DRAINING = "draining"  # accepts nothing new; its live connections finish, then it exits


@dataclass(slots=True)
class WorkerRecord:
    worker_id: int
    slot: int | None  # None once draining: the slot went to its replacement
    state: WorkerState = WorkerState.STARTING
    pid: int | None = None


@dataclass(frozen=True, slots=True)
class Restart:
    slot: int
    delay_s: float


@dataclass(slots=True)
class WorkerTable:
    """Slots 0..count-1, each held by at most one worker; draining workers hold none."""

    count: int
    workers: dict[int, WorkerRecord] = field(default_factory=dict)
    failures: dict[int, int] = field(default_factory=dict)  # slot -> deaths before serving
    _next_id: int = 0

    def spawn(self, slot: int) -> WorkerRecord:
        record = WorkerRecord(self._next_id, slot)
        self._next_id += 1
        self.workers[record.worker_id] = record
        return record

    def empty_slots(self) -> list[int]:
        held = {w.slot for w in self.workers.values() if w.slot is not None}
        return [s for s in range(self.count) if s not in held]

    def ready(self, worker_id: int, pid: int) -> None:
        record = self.workers.get(worker_id)
        if record is not None and record.state is WorkerState.STARTING:
            record.state = WorkerState.SERVING
            record.pid = pid
            if record.slot is not None:
                self.failures.pop(record.slot, None)

    def draining(self, worker_id: int) -> int | None:
        """The worker drains: its slot (to refill at once), if it held one."""
        record = self.workers.get(worker_id)
        if record is None:
            return None
        slot, record.slot = record.slot, None
        record.state = WorkerState.DRAINING
        return slot

    def exited(self, worker_id: int, *, stopping: bool) -> Restart | None:
        """A worker process ended: replace it unless the daemon stops or it was draining."""
        record = self.workers.pop(worker_id, None)
        if record is None or record.slot is None or stopping:
            return None
        delay = 0.0
        if record.state is WorkerState.STARTING:  # died before serving: back off
            failures = self.failures.get(record.slot, 0)
            self.failures[record.slot] = failures + 1
            delay = min(RESTART_BACKOFF_S * 2**failures, RESTART_BACKOFF_MAX_S)
        return Restart(record.slot, delay)

    def all_serving(self) -> bool:
        serving = {
            w.slot
            for w in self.workers.values()
            if w.state is WorkerState.SERVING and w.slot is not None
        }
        return len(serving) == self.count

    def accepting(self) -> list[int]:
        """Workers that take new pods (not draining)."""
        return [w.worker_id for w in self.workers.values() if w.state is not WorkerState.DRAINING]

    def dump(self) -> list[dict[str, Any]]:
        return [
            {"id": w.worker_id, "slot": w.slot, "state": w.state.value, "pid": w.pid}
            for w in sorted(self.workers.values(), key=lambda w: w.worker_id)
        ]


# ---------------------------------------------------------------- state to the workers


def snapshot(state: ProxyState) -> UpdateBatch:
    """The whole state as one replacing batch (a new worker's first one)."""
    return UpdateBatch(
        workloads=tuple(state.workloads()),
        services=tuple(state.services()),
        policies=tuple(state.policies()),
        replace=True,
    )


def batch_for(changes: ChangeSet, state: ProxyState) -> UpdateBatch:
    """What a worker must apply to follow one ``ChangeSet`` of ``state`` (after it applied)."""
    workloads = tuple(w for uid in sorted(changes.workloads_upserted) if (w := state.workload(uid)))
    services = tuple(s for key in sorted(changes.services_upserted) if (s := state.service(key)))
    policies = tuple(p for key in sorted(changes.policies_upserted) if (p := state.policy(key)))
    return UpdateBatch(
        workloads=workloads,
        services=services,
        policies=policies,
        removed_addresses=tuple(sorted(changes.workloads_removed | changes.services_removed)),
        removed_policies=tuple(sorted(changes.policies_removed)),
    )


# ---------------------------------------------------------------- one daemon's metrics


def merge_families(sources: Iterable[Iterable[Metric]]) -> list[Metric]:
    """Families of several processes as one: same family and sample names and labels, values
    summed (a gauge of live connections adds up as a counter does)."""
    merged: dict[str, Metric] = {}
    values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    for families in sources:
        for family in families:
            into = merged.get(family.name)
            if into is None:
                into = merged[family.name] = Metric(
                    family.name, family.documentation, family.type, family.unit
                )
                values[family.name] = {}
            elif into.type != family.type:
                continue  # same name, another type: keep the first one seen (never mixed)
            table = values[family.name]
            for sample in family.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                table[key] = table.get(key, 0.0) + sample.value
    for name, family in merged.items():
        for (sample_name, labels), value in values[name].items():
            family.add_sample(sample_name, dict(labels), value)
    return list(merged.values())


def retired_counts(families: Iterable[Metric]) -> list[Metric]:
    """What stays counted of a worker that is gone: counters and histograms, no gauges."""
    return [f for f in families if f.type in CUMULATIVE_TYPES]


def merge_connections(dumps: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Live connections per workload uid, listed from every worker."""
    out: dict[str, dict[str, list[Any]]] = {}
    for dump in dumps:
        for uid, lists in dump.items():
            entry = out.setdefault(uid, {"inbound": [], "outbound": []})
            for direction in ("inbound", "outbound"):
                entry[direction].extend(lists.get(direction, ()))
    return out
