"""Live re-authorization of tracked inbound connections on policy changes."""

from __future__ import annotations

import ipaddress
import logging

import pytest

from ztunnel_py.proxy.conntrack import POLICY_CHANGE_ERROR, ConnectionTracker, TrackedConnection
from ztunnel_py.rbac.evaluate import ConnectionInfo
from ztunnel_py.rbac.model import (
    Action,
    Authorization,
    Match,
    Scope,
    StringMatch,
    StringMatchKind,
)
from ztunnel_py.state.model import Workload
from ztunnel_py.state.store import ProxyState, UpdateBatch

WORKLOAD = Workload(
    uid="w1", name="w1", namespace="ns1", workload_ips=(ipaddress.ip_address("10.0.0.2"),)
)


def conn(src: str, port: int = 8080, identity: str | None = None) -> ConnectionInfo:
    return ConnectionInfo(
        src_ip=ipaddress.ip_address(src),
        src_port=40000,
        dst_ip=ipaddress.ip_address("10.0.0.2"),
        dst_port=port,
        src_identity=identity,
    )


def deny_source(name: str, cidr: str) -> Authorization:
    match = Match(source_ips=(ipaddress.ip_network(cidr),))
    return Authorization(name=name, namespace="ns1", action=Action.DENY, rules=(((match,),),))


class Closer:
    def __init__(self) -> None:
        self.reasons: list[str] = []

    def __call__(self, reason: str) -> None:
        self.reasons.append(reason)


@pytest.fixture
def state() -> ProxyState:
    s = ProxyState()
    s.apply(UpdateBatch(workloads=(WORKLOAD,)))
    return s


def test_denied_connections_are_closed_and_allowed_ones_untouched(state: ProxyState) -> None:
    tracker = ConnectionTracker()
    bad, good = Closer(), Closer()
    h_bad = tracker.register(conn("10.1.0.5"), "w1", bad)
    h_good = tracker.register(conn("10.2.0.5"), "w1", good)
    assert tracker.on_policy_change(state) == []

    state.apply(UpdateBatch(policies=(deny_source("block", "10.1.0.0/16"),)))
    closed = tracker.on_policy_change(state)

    assert closed == [h_bad]
    assert bad.reasons == [POLICY_CHANGE_ERROR]
    assert good.reasons == []
    assert h_bad not in tracker
    assert h_good in tracker
    # Closed connections are forgotten: a second change does not close them again.
    assert tracker.on_policy_change(state) == []
    assert bad.reasons == [POLICY_CHANGE_ERROR]


def test_a_new_allow_policy_closes_connections_it_does_not_cover(state: ProxyState) -> None:
    tracker = ConnectionTracker()
    peer, plain = Closer(), Closer()
    tracker.register(conn("10.1.0.5", identity="spiffe://cluster.local/ns/ns1/sa/a"), "w1", peer)
    tracker.register(conn("10.1.0.6"), "w1", plain)
    presence = StringMatch(StringMatchKind.PRESENCE)
    only_mtls = Authorization(
        name="mtls-only",
        namespace="ns1",
        action=Action.ALLOW,
        rules=(((Match(principals=(presence,)),),),),
    )
    state.apply(UpdateBatch(policies=(only_mtls,)))
    tracker.on_policy_change(state)
    assert (peer.reasons, plain.reasons) == ([], [POLICY_CHANGE_ERROR])


def test_unregistered_connections_are_not_evaluated(state: ProxyState) -> None:
    tracker = ConnectionTracker()
    closer = Closer()
    handle = tracker.register(conn("10.1.0.5"), "w1", closer)
    tracker.unregister(handle)
    tracker.unregister(handle)  # idempotent
    state.apply(UpdateBatch(policies=(deny_source("block", "10.1.0.0/16"),)))
    assert tracker.on_policy_change(state) == []
    assert closer.reasons == []
    assert len(tracker) == 0


def test_selector_policy_added_to_the_workload_counts(state: ProxyState) -> None:
    tracker = ConnectionTracker()
    closer = Closer()
    tracker.register(conn("10.1.0.5"), "w1", closer)
    selector = Authorization(
        name="sel",
        namespace="ns1",
        scope=Scope.WORKLOAD_SELECTOR,
        action=Action.DENY,
        rules=deny_source("x", "10.0.0.0/8").rules,
    )
    state.apply(UpdateBatch(policies=(selector,)))
    assert tracker.on_policy_change(state) == []  # not selected yet
    selected = Workload(
        uid="w1",
        name="w1",
        namespace="ns1",
        workload_ips=WORKLOAD.workload_ips,
        authorization_policies=("ns1/sel",),
    )
    state.apply(UpdateBatch(workloads=(selected,)))
    assert len(tracker.on_policy_change(state)) == 1
    assert closer.reasons == [POLICY_CHANGE_ERROR]


def test_removed_workload_uses_its_last_known_copy(state: ProxyState) -> None:
    tracker = ConnectionTracker()
    seen, unseen = Closer(), Closer()
    tracker.register(conn("10.1.0.5"), "w1", seen)
    tracker.register(conn("10.1.0.6"), "gone-before-first-check", unseen)
    tracker.on_policy_change(state)  # remembers w1
    state.apply(UpdateBatch(removed_addresses=("w1",)))
    state.apply(UpdateBatch(policies=(deny_source("block", "10.1.0.0/16"),)))
    tracker.on_policy_change(state)
    assert seen.reasons == [POLICY_CHANGE_ERROR]
    assert unseen.reasons == []  # nothing to evaluate against: left to pod teardown


def test_workload_given_at_registration_stands_in(state: ProxyState) -> None:
    tracker = ConnectionTracker()
    closer = Closer()
    other = Workload(uid="w9", name="w9", namespace="ns1")
    tracker.register(conn("10.1.0.5"), "w9", closer, workload=other)
    state.apply(UpdateBatch(policies=(deny_source("block", "10.1.0.0/16"),)))
    tracker.on_policy_change(state)
    assert closer.reasons == [POLICY_CHANGE_ERROR]


def test_a_failing_close_callback_does_not_keep_others_open(
    state: ProxyState, caplog: pytest.LogCaptureFixture
) -> None:
    tracker = ConnectionTracker()

    def broken(reason: str) -> None:
        raise RuntimeError("socket already gone")

    after = Closer()
    h1 = tracker.register(conn("10.1.0.5"), "w1", broken)
    h2 = tracker.register(conn("10.1.0.6"), "w1", after)
    state.apply(UpdateBatch(policies=(deny_source("block", "10.1.0.0/16"),)))
    with caplog.at_level(logging.INFO, logger="ztunnel_py.proxy.conntrack"):
        closed = tracker.on_policy_change(state)
    assert closed == [h1, h2]
    assert after.reasons == [POLICY_CHANGE_ERROR]
    assert len(tracker) == 0
    assert any("failed" in r.getMessage() for r in caplog.records)
    assert any("no longer allowed" in r.getMessage() for r in caplog.records)


def test_close_callback_may_unregister_itself(state: ProxyState) -> None:
    tracker = ConnectionTracker()
    handles: list[TrackedConnection] = []

    def close(reason: str) -> None:
        tracker.unregister(handles[0])

    handles.append(tracker.register(conn("10.1.0.5"), "w1", close))
    state.apply(UpdateBatch(policies=(deny_source("block", "10.1.0.0/16"),)))
    assert tracker.on_policy_change(state) == handles
    assert len(tracker) == 0
