"""Which certificates this node needs: one per identity of its mesh workloads (ztunnel's prefetch).

Follows state changes incrementally (only the workloads a change names are looked at), keeps
a reference count per identity, prefetches an identity when its first workload on this node
appears and forgets it when the last one leaves.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from typing import Protocol

from ztunnel_py.identity.spiffe import Identity
from ztunnel_py.state.model import InboundProtocol, Workload
from ztunnel_py.state.store import ChangeSet, ProxyState


class PrefetchTarget(Protocol):
    def prefetch(self, identities: list[Identity]) -> None: ...
    def forget(self, identity: Identity) -> None: ...


def workload_identity(w: Workload) -> Identity:
    return Identity(w.trust_domain, w.namespace, w.service_account)


def needs_certificate(w: Workload, node: str) -> bool:
    """Workloads on this node that terminate HBONE here (or speak it natively)."""
    return w.node == node and (w.protocol is InboundProtocol.HBONE or w.native_tunnel)


class NodeCertificates:
    def __init__(self, target: PrefetchTarget, state: ProxyState, node: str | None) -> None:
        self._target = target
        self._state = state
        self._node = node
        self._by_uid: dict[str, Identity] = {}
        self._refs: Counter[Identity] = Counter()

    def sync_all(self) -> None:
        """Look at every workload (at start, or after a full replace)."""
        self._update([*self._by_uid, *(w.uid for w in self._state.workloads())])

    def on_change(self, changes: ChangeSet) -> None:
        self._update([*changes.workloads_upserted, *changes.workloads_removed])

    def identities(self) -> list[Identity]:
        return sorted(self._refs)

    def _update(self, uids: Iterable[str]) -> None:
        if self._node is None:
            return
        added: list[Identity] = []
        for uid in dict.fromkeys(uids):
            w = self._state.workload(uid)
            new = (
                workload_identity(w) if w is not None and needs_certificate(w, self._node) else None
            )
            old = self._by_uid.get(uid)
            if old == new:
                continue
            if old is not None:
                del self._by_uid[uid]
                self._refs[old] -= 1
                if self._refs[old] == 0:
                    del self._refs[old]
                    self._target.forget(old)
            if new is not None:
                self._by_uid[uid] = new
                self._refs[new] += 1
                if self._refs[new] == 1:
                    added.append(new)
        if added:
            self._target.prefetch(added)
