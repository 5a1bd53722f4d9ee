"""The pure core of multi-worker mode: the worker table, state batches, merged metrics."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.metrics_core import Metric

from tests.unit.state.test_store import svc, wl
from ztunnel_py.rbac.model import Authorization, Scope
from ztunnel_py.state.store import ProxyState, UpdateBatch
from ztunnel_py.workers.plan import (
    RESTART_BACKOFF_S,
    Restart,
    WorkerState,
    WorkerTable,
    batch_for,
    merge_connections,
    merge_families,
    retired_counts,
    snapshot,
)


def test_a_worker_that_served_is_replaced_at_once_one_that_never_did_backs_off() -> None:
    table = WorkerTable(2)
    first, second = (table.spawn(slot) for slot in table.empty_slots())
    assert table.empty_slots() == []
    table.ready(first.worker_id, pid=10)
    assert not table.all_serving()
    table.ready(second.worker_id, pid=11)
    assert table.all_serving()

    assert table.exited(first.worker_id, stopping=False) == Restart(0, 0.0)
    crashing = table.spawn(0)
    assert table.exited(crashing.worker_id, stopping=False) == Restart(0, RESTART_BACKOFF_S)
    crashing = table.spawn(0)
    assert table.exited(crashing.worker_id, stopping=False) == Restart(0, 2 * RESTART_BACKOFF_S)
    served = table.spawn(0)
    table.ready(served.worker_id, pid=12)  # serving again: the backoff starts over
    assert table.exited(served.worker_id, stopping=False) == Restart(0, 0.0)


def test_a_draining_worker_frees_its_slot_and_is_not_replaced_when_it_exits() -> None:
    table = WorkerTable(1)
    old = table.spawn(0)
    table.ready(old.worker_id, pid=10)
    assert table.draining(old.worker_id) == 0
    assert old.state is WorkerState.DRAINING
    assert table.accepting() == []  # no new pods for it
    new = table.spawn(0)
    assert table.accepting() == [new.worker_id]
    assert table.exited(old.worker_id, stopping=False) is None
    assert table.exited(new.worker_id, stopping=True) is None  # the daemon stops


def test_state_changes_become_the_batch_a_worker_applies() -> None:
    source, copy = ProxyState(), ProxyState()
    a, b = wl("a"), wl("b", ips=("10.0.0.2",))
    web = svc("web")
    deny = Authorization(name="d", namespace="default", scope=Scope.NAMESPACE)
    source.apply(UpdateBatch(workloads=(a, b), services=(web,), policies=(deny,)))
    copy.apply(snapshot(source))
    assert list(copy.workloads()) == list(source.workloads())
    assert list(copy.services()) == list(source.services())
    assert list(copy.policies()) == list(source.policies())

    changes = source.apply(
        UpdateBatch(
            workloads=(wl("a", ips=("10.0.0.9",)),),
            removed_addresses=(b.uid, web.key),
            removed_policies=(deny.key,),
        )
    )
    copy.apply(batch_for(changes, source))
    assert list(copy.workloads()) == list(source.workloads()) == [wl("a", ips=("10.0.0.9",))]
    assert list(copy.services()) == []
    assert list(copy.policies()) == []


def _families(opened: float, active: float) -> list[Metric]:
    registry = CollectorRegistry()
    counter = Counter("istio_tcp_connections_opened", "opened", ["reporter"], registry=registry)
    counter.labels(reporter="destination").inc(opened)
    Gauge("live", "live now", registry=registry).set(active)
    return list(registry.collect())


def _value(families: list[Metric], sample_name: str, **labels: str) -> float:
    return sum(
        s.value for f in families for s in f.samples if s.name == sample_name and s.labels == labels
    )


def test_families_of_several_workers_sum_under_the_same_names() -> None:
    merged = merge_families([_families(2, 1), _families(3, 4)])
    assert _value(merged, "istio_tcp_connections_opened_total", reporter="destination") == 5
    assert _value(merged, "live") == 5
    assert sorted(f.name for f in merged) == ["istio_tcp_connections_opened", "live"]


def test_a_gone_workers_counters_stay_counted_its_gauges_do_not() -> None:
    retired = retired_counts(_families(7, 9))
    assert [f.name for f in retired] == ["istio_tcp_connections_opened"]
    merged = merge_families([_families(1, 1), retired])
    assert _value(merged, "istio_tcp_connections_opened_total", reporter="destination") == 8
    assert _value(merged, "live") == 1


def test_same_name_of_another_type_is_never_mixed_in() -> None:
    odd = Metric("live", "a counter by mistake", "counter")
    odd.add_sample("live_total", {}, 100)
    merged = merge_families([_families(0, 2), [odd]])
    assert _value(merged, "live") == 2
    assert _value(merged, "live_total") == 0


def test_live_connections_of_every_worker_are_listed_together() -> None:
    one = {"w1": {"inbound": [{"id": 1}], "outbound": []}}
    two = {"w1": {"inbound": [{"id": 2}], "outbound": [{"id": 3}]}, "w2": {"inbound": []}}
    assert merge_connections([one, two]) == {
        "w1": {"inbound": [{"id": 1}, {"id": 2}], "outbound": [{"id": 3}]},
        "w2": {"inbound": [], "outbound": []},
    }
