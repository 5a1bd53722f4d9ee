"""Apply the projection to the maps: only the difference, in an order that never exposes a
half-written pod.

``plan(applied, desired)`` is pure and returns the ordered operations:

1. delete ``zt_pods`` entries that go away (an unenrolled pod stops being captured before any
   of its other entries disappear);
2. add or change child entries (``zt_dst``, ``zt_local``, ``zt_deny``);
3. delete child entries that go away (after the additions, so a changed rule set is briefly
   the union of old and new, never neither);
4. add or change ``zt_pods`` entries (an enrolled pod's switch is written after its children).

``Reconciler`` runs the plan through ``MapOps`` and remembers what succeeded, so the next
``apply`` retries only what failed. A failing entry does not stop the others: a pod whose DENY
rule could not be written is still captured (the proxy enforces the policy), which is the
fail-closed choice. ``MapSync`` keeps the enrolled pods and re-projects on every change, reusing
what the change cannot have touched (mesh destinations, compiled DENY rules).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from ztunnel_py.bpf.errors import BpfError
from ztunnel_py.bpf.maps import MapOps
from ztunnel_py.bpf.projection import (
    CHILD_MAPS,
    PARENT_MAP,
    POD_MAPS,
    RECONCILED_MAPS,
    DenyCompiler,
    DesiredMaps,
    EnrolledPod,
    kernel_deny_rules,
    key_cookie,
    mesh_cidr_destinations,
    mesh_destinations,
    project,
)
from ztunnel_py.rbac.kernel import KernelDenyRule
from ztunnel_py.state.model import Workload
from ztunnel_py.state.store import ChangeSet, ProxyState

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class MapOp:
    map_name: str
    key: bytes
    value: bytes | None  # None: delete


@dataclass(slots=True)
class ReconcileResult:
    updated: int = 0
    deleted: int = 0
    failed: list[tuple[MapOp, BpfError]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failed


class ReconcileError(BpfError):
    """Some entries could not be written; the rest were. The next apply retries them."""

    def __init__(self, result: ReconcileResult) -> None:
        self.result = result
        first_op, first_error = result.failed[0]
        super().__init__(
            f"{len(result.failed)} BPF map operation(s) failed, first on {first_op.map_name}: "
            f"{first_error}"
        )


def plan(applied: Mapping[str, Mapping[bytes, bytes]], desired: DesiredMaps) -> list[MapOp]:
    """The ordered operations that turn ``applied`` into ``desired`` (see the module doc)."""

    def upserts(name: str) -> list[MapOp]:
        old = applied.get(name, {})
        return [
            MapOp(name, key, value)
            for key, value in desired.get(name, {}).items()
            if old.get(key) != value
        ]

    def deletes(name: str) -> list[MapOp]:
        new = desired.get(name, {})
        return [MapOp(name, key, None) for key in applied.get(name, {}) if key not in new]

    ops = deletes(PARENT_MAP)
    for name in CHILD_MAPS:
        ops += upserts(name)
    for name in CHILD_MAPS:
        ops += deletes(name)
    ops += upserts(PARENT_MAP)
    return ops


class Reconciler:
    """Owns the reconciled maps' content; ``apply`` writes only the difference."""

    def __init__(self, maps: Mapping[str, MapOps]) -> None:
        missing = [name for name in RECONCILED_MAPS if name not in maps]
        if missing:
            raise ValueError(f"reconciler needs the maps {missing}")
        self._maps = maps
        self._applied: dict[str, dict[bytes, bytes]] = {name: {} for name in RECONCILED_MAPS}

    @property
    def applied(self) -> Mapping[str, Mapping[bytes, bytes]]:
        return self._applied

    def resync(self) -> None:
        """Take the maps' current content as applied (after a restart with pinned maps), so
        the next ``apply`` also removes what the previous daemon left and nobody wants now."""
        for name in RECONCILED_MAPS:
            self._applied[name] = dict(self._maps[name].items())

    def apply(self, desired: DesiredMaps) -> ReconcileResult:
        """Apply the difference; raises ``ReconcileError`` (after doing all it could)."""
        result = ReconcileResult()
        for op in plan(self._applied, desired):
            target = self._maps[op.map_name]
            try:
                if op.value is None:
                    target.delete(op.key)
                    self._applied[op.map_name].pop(op.key, None)
                    result.deleted += 1
                else:
                    target.update(op.key, op.value)
                    self._applied[op.map_name][op.key] = op.value
                    result.updated += 1
            except BpfError as e:
                result.failed.append((op, e))
        if result.failed:
            raise ReconcileError(result)
        return result


class MapSync:
    """The enrolled pods plus the state: re-projects and applies on every change.

    Two parts of a projection are kept between changes that cannot affect them, so enrolling a
    pod or changing a policy does not walk every workload and service again: the mesh
    destinations (``zt_dst``, from workloads, services and endpoints only) and each pod
    workload's compiled DENY rules (until that workload object or any policy changes). So
    ``state_changed`` must see every ``ChangeSet``; ``None`` means "unknown" and forgets both.

    After a restart, ``inherit`` keeps the pods a previous daemon left in the pinned maps as
    they are until ``release_inherited`` (the node agent's snapshot): the agent names them one
    by one, and enrolling the first must not un-capture the others meanwhile.
    """

    def __init__(
        self,
        state: ProxyState,
        reconciler: Reconciler,
        *,
        network: str = "",
        compile_deny: DenyCompiler | None = kernel_deny_rules,
    ) -> None:
        self.state = state
        self.reconciler = reconciler
        self.network = network
        self.compile_deny = compile_deny
        self._pods: dict[str, EnrolledPod] = {}
        self._deny_cache: dict[str, tuple[Workload, tuple[KernelDenyRule, ...]]] = {}
        self._destinations: dict[bytes, bytes] | None = None  # None: project them again
        self._cidr_destinations: dict[bytes, bytes] = {}  # projected with _destinations
        # netns cookie -> map name -> entries, of pods a previous daemon enrolled
        self._inherited: dict[int, dict[str, dict[bytes, bytes]]] = {}

    @property
    def pods(self) -> Mapping[str, EnrolledPod]:
        return self._pods

    @property
    def inherited(self) -> set[int]:
        """Netns cookies of the previous daemon's pods that are still kept as they were."""
        return set(self._inherited)

    def desired(self) -> DesiredMaps:
        if self._destinations is None:
            self._destinations = mesh_destinations(self.state, network=self.network)
            self._cidr_destinations = mesh_cidr_destinations(self.state, network=self.network)
        desired = project(
            self.state,
            self._pods.values(),
            network=self.network,
            compile_deny=self._compile_cached if self.compile_deny is not None else None,
            destinations=self._destinations,
            cidr_destinations=self._cidr_destinations,
        )
        for entries in self._inherited.values():
            for name, kept in entries.items():
                desired[name].update(kept)
        return desired

    def inherit(self) -> int:
        """Keep the pods found in the applied maps (call after ``Reconciler.resync``); returns
        how many there are."""
        self._inherited = {}
        for name in POD_MAPS:
            for key, value in self.reconciler.applied[name].items():
                entries = self._inherited.setdefault(key_cookie(name, key), {})
                entries.setdefault(name, {})[key] = value
        for pod in self._pods.values():
            self._inherited.pop(pod.netns_cookie, None)
        return len(self._inherited)

    def release_inherited(self, keep: Iterable[int] = ()) -> ReconcileResult:
        """Stop keeping inherited pods, except those whose netns cookie is in ``keep`` (pods
        the daemon holds but has not enrolled yet: they stay captured, failing closed)."""
        wanted = set(keep)
        self._inherited = {c: e for c, e in self._inherited.items() if c in wanted}
        return self.refresh()

    def _compile_cached(self, state: ProxyState, workload: Workload) -> tuple[KernelDenyRule, ...]:
        assert self.compile_deny is not None
        hit = self._deny_cache.get(workload.uid)
        if hit is not None and hit[0] is workload:
            return hit[1]
        rules = tuple(self.compile_deny(state, workload))
        self._deny_cache[workload.uid] = (workload, rules)
        return rules

    def enroll(self, pod: EnrolledPod) -> ReconcileResult:
        self._pods[pod.uid] = pod
        self._inherited.pop(pod.netns_cookie, None)  # its own entries replace the old ones
        return self.refresh()

    def unenroll(self, uid: str) -> ReconcileResult:
        self._pods.pop(uid, None)
        return self.refresh()

    def state_changed(self, changes: ChangeSet | None = None) -> ReconcileResult | None:
        if changes is not None and changes.is_empty:
            return None
        if changes is None or changes.policies_upserted or changes.policies_removed:
            self._deny_cache.clear()
        if changes is None or _addresses_changed(changes):
            self._destinations = None
        return self.refresh()

    def refresh(self) -> ReconcileResult:
        live = {pod.workload_uid for pod in self._pods.values()}
        for uid in [u for u in self._deny_cache if u not in live]:
            del self._deny_cache[uid]
        result = self.reconciler.apply(self.desired())
        if result.updated or result.deleted:
            log.debug("bpf maps: %d updated, %d deleted", result.updated, result.deleted)
        return result


def _addresses_changed(changes: ChangeSet) -> bool:
    """Whether ``changes`` may change the mesh destinations (policies never do)."""
    return bool(
        changes.workloads_upserted
        or changes.workloads_removed
        or changes.services_upserted
        or changes.services_removed
        or changes.endpoints_changed
    )
