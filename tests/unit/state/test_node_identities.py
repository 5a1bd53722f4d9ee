"""NodeCertificates: prefetch the identities of this node's mesh workloads, forget the last."""

from __future__ import annotations

from ztunnel_py.identity.spiffe import Identity
from ztunnel_py.state.model import InboundProtocol, Workload
from ztunnel_py.state.node_identities import NodeCertificates
from ztunnel_py.state.store import ProxyState, UpdateBatch


class Recorder:
    def __init__(self) -> None:
        self.prefetched: list[Identity] = []
        self.forgotten: list[Identity] = []

    def prefetch(self, identities: list[Identity]) -> None:
        self.prefetched += identities

    def forget(self, identity: Identity) -> None:
        self.forgotten.append(identity)


def wl(name: str, *, sa: str = "sa", node: str = "n1", hbone: bool = True) -> Workload:
    return Workload(
        uid=f"u/{name}",
        name=name,
        namespace="ns",
        service_account=sa,
        node=node,
        protocol=InboundProtocol.HBONE if hbone else InboundProtocol.TCP,
    )


def test_prefetch_once_per_identity_and_forget_with_the_last_workload() -> None:
    state, rec = ProxyState(), Recorder()
    certs = NodeCertificates(rec, state, "n1")
    certs.on_change(state.apply(UpdateBatch(workloads=(wl("a"), wl("b"), wl("c", node="n2")))))
    sa = Identity("cluster.local", "ns", "sa")
    assert rec.prefetched == [sa]
    certs.on_change(state.apply(UpdateBatch(removed_addresses=("u/a",))))
    assert rec.forgotten == []
    certs.on_change(state.apply(UpdateBatch(removed_addresses=("u/b",))))
    assert rec.forgotten == [sa]
    assert certs.identities() == []


def test_tcp_workloads_and_other_nodes_need_no_certificate() -> None:
    state, rec = ProxyState(), Recorder()
    certs = NodeCertificates(rec, state, "n1")
    certs.on_change(state.apply(UpdateBatch(workloads=(wl("a", hbone=False), wl("b", node="n2")))))
    assert rec.prefetched == []


def test_a_workload_changing_service_account_moves_its_identity() -> None:
    state, rec = ProxyState(), Recorder()
    certs = NodeCertificates(rec, state, "n1")
    certs.on_change(state.apply(UpdateBatch(workloads=(wl("a", sa="old"),))))
    certs.on_change(state.apply(UpdateBatch(workloads=(wl("a", sa="new"),))))
    assert rec.prefetched == [
        Identity("cluster.local", "ns", "old"),
        Identity("cluster.local", "ns", "new"),
    ]
    assert rec.forgotten == [Identity("cluster.local", "ns", "old")]


def test_sync_all_and_no_node_name() -> None:
    state = ProxyState()
    state.apply(UpdateBatch(workloads=(wl("a"),)))
    rec = Recorder()
    NodeCertificates(rec, state, "n1").sync_all()
    assert rec.prefetched == [Identity("cluster.local", "ns", "sa")]
    rec2 = Recorder()
    NodeCertificates(rec2, state, None).sync_all()
    assert rec2.prefetched == []
