"""bpf.reconcile against FakeMapOps: differences only, safe order, retries, random churn."""

from __future__ import annotations

import ipaddress
import random

import pytest

from ztunnel_py.bpf import _types as t
from ztunnel_py.bpf import reconcile
from ztunnel_py.bpf.errors import MapFull
from ztunnel_py.bpf.projection import (
    CHILD_MAPS,
    EnrolledPod,
    deny_key,
    dst_key,
    local_key,
    mesh_destinations,
    pod_key,
    project,
)
from ztunnel_py.bpf.reconcile import MapOp, MapSync, ReconcileError, Reconciler, plan
from ztunnel_py.rbac.model import Action, Authorization, Match, Scope
from ztunnel_py.state.model import (
    CidrVip,
    GatewayAddress,
    InboundProtocol,
    NetworkAddress,
    Service,
    Workload,
    frozen_map,
)
from ztunnel_py.state.store import ProxyState, UpdateBatch
from ztunnel_py.testing.bpf import FakeMapOps, Journal, fake_maps

ip = ipaddress.ip_address


def owner(map_name: str, key: bytes) -> int | None:
    """The netns cookie a child entry belongs to (None for the global zt_dst)."""
    if map_name == t.MAP_LOCAL:
        return int(t.ZtLocalKey.from_buffer_copy(key).netns_cookie)
    if map_name == t.MAP_DENY:
        k = t.ZtDenyKey.from_buffer_copy(key)
        return int(k.netns_cookie_lo | (k.netns_cookie_hi << 32))
    return None


def check_order(
    before: dict[str, set[bytes]], journal: Journal, desired: dict[str, dict[bytes, bytes]]
) -> None:
    """Replay the writes: a pod's switch is only on when its children are all there, and a
    leaving pod's children disappear only after its switch is off."""
    live = {name: set(keys) for name, keys in before.items()}
    wanted_children: dict[int, set[tuple[str, bytes]]] = {}
    for name in CHILD_MAPS:
        for key in desired[name]:
            cookie = owner(name, key)
            if cookie is not None:
                wanted_children.setdefault(cookie, set()).add((name, key))
    for op, name, key in journal:
        if op == "update":
            live[name].add(key)
            if name == t.MAP_PODS:
                cookie = int(t.ZtPodKey.from_buffer_copy(key).netns_cookie)
                missing = {
                    (n, k) for n, k in wanted_children.get(cookie, set()) if k not in live[n]
                }
                assert not missing, f"pod {cookie} switched on before {len(missing)} children"
        else:
            live[name].discard(key)
            cookie = owner(name, key)
            if cookie is not None and pod_key(cookie) not in desired[t.MAP_PODS]:
                assert pod_key(cookie) not in live[t.MAP_PODS], (
                    f"child of leaving pod {cookie} removed while its switch is still on"
                )


def contents(maps: dict[str, FakeMapOps]) -> dict[str, dict[bytes, bytes]]:
    return {name: dict(m.entries) for name, m in maps.items()}


def hbone(uid: str, addr: str) -> Workload:
    return Workload(
        uid=uid, name=uid, namespace="ns", workload_ips=(ip(addr),), protocol=InboundProtocol.HBONE
    )


# ------------------------------------------------------------------ plan and order


def test_reconcile_enroll_writes_children_before_the_pod_and_unenroll_reverses() -> None:
    journal: Journal = []
    maps = fake_maps(journal=journal)
    state = ProxyState()
    state.apply(UpdateBatch(workloads=(hbone("w", "10.0.0.5"),)))
    sync = MapSync(state, Reconciler(maps))
    pod = EnrolledPod("uid", 7, (ip("10.0.0.5"),), "w")

    sync.enroll(pod)
    assert [(op, name) for op, name, _ in journal] == [
        ("update", t.MAP_DST),
        ("update", t.MAP_LOCAL),
        ("update", t.MAP_PODS),
    ]
    journal.clear()
    sync.unenroll("uid")
    assert [(op, name) for op, name, _ in journal] == [
        ("delete", t.MAP_PODS),
        ("delete", t.MAP_LOCAL),
    ]
    assert maps[t.MAP_DST].entries == {dst_key(ip("10.0.0.5"), 0): bytes(t.ZtDst(kind=1))}


def test_reconcile_applies_only_the_difference() -> None:
    journal: Journal = []
    maps = fake_maps(journal=journal)
    reconciler = Reconciler(maps)
    desired = {
        t.MAP_DST: {
            dst_key(ip("10.0.0.1"), 0): b"\1\0\0\0",
            dst_key(ip("10.0.0.2"), 0): b"\1\0\0\0",
        },
        t.MAP_LOCAL: {},
        t.MAP_DENY: {},
        t.MAP_PODS: {},
    }
    assert reconciler.apply(desired).updated == 2
    journal.clear()
    result = reconciler.apply(desired)
    assert (result.updated, result.deleted, journal) == (0, 0, [])
    desired[t.MAP_DST] = {dst_key(ip("10.0.0.2"), 0): b"\2\0\0\0"}
    result = reconciler.apply(desired)
    assert (result.updated, result.deleted) == (1, 1)
    assert contents(maps)[t.MAP_DST] == desired[t.MAP_DST]


def test_reconcile_changed_rule_set_is_briefly_the_union_never_neither() -> None:
    old, new = deny_key(9, None, 80), deny_key(9, None, 443)
    assert old is not None and new is not None
    base = {t.MAP_DST: {}, t.MAP_LOCAL: {}, t.MAP_PODS: {pod_key(9): bytes(8)}}
    ops = plan({**base, t.MAP_DENY: {old: b"\1\0\0\0"}}, {**base, t.MAP_DENY: {new: b"\1\0\0\0"}})
    assert ops == [MapOp(t.MAP_DENY, new, b"\1\0\0\0"), MapOp(t.MAP_DENY, old, None)]


def test_reconcile_failure_does_not_stop_other_entries_and_is_retried() -> None:
    maps = fake_maps()
    state = ProxyState()
    state.apply(UpdateBatch(workloads=(hbone("w", "10.0.0.5"),)))
    sync = MapSync(state, Reconciler(maps))
    bad = local_key(7, ip("10.0.0.5"))
    maps[t.MAP_LOCAL].fail_on.add(bad)

    with pytest.raises(ReconcileError, match="1 BPF map operation"):
        sync.enroll(EnrolledPod("uid", 7, (ip("10.0.0.5"),), "w"))
    # Capture is still switched on (fail closed); only the local-address entry is missing.
    assert pod_key(7) in maps[t.MAP_PODS].entries
    assert bad not in maps[t.MAP_LOCAL].entries

    maps[t.MAP_LOCAL].fail_on.clear()
    assert sync.refresh().updated == 1
    assert contents(maps) == project(state, sync.pods.values())


def test_reconcile_full_map_is_reported() -> None:
    maps = fake_maps()
    maps[t.MAP_DST] = FakeMapOps(t.MAP_DST, max_entries=1)
    reconciler = Reconciler(maps)
    desired = {
        t.MAP_DST: {
            dst_key(ip("10.0.0.1"), 0): b"\1\0\0\0",
            dst_key(ip("10.0.0.2"), 0): b"\1\0\0\0",
        },
        t.MAP_LOCAL: {},
        t.MAP_DENY: {},
        t.MAP_PODS: {},
    }
    with pytest.raises(ReconcileError) as info:
        reconciler.apply(desired)
    assert isinstance(info.value.result.failed[0][1], MapFull)
    assert len(maps[t.MAP_DST].entries) == 1


def test_reconcile_resync_removes_what_a_previous_daemon_left() -> None:
    maps = fake_maps()
    maps[t.MAP_PODS].entries[pod_key(99)] = bytes(8)  # left behind, pod gone since
    maps[t.MAP_LOCAL].entries[local_key(99, ip("10.9.9.9"))] = bytes(4)
    reconciler = Reconciler(maps)
    reconciler.resync()
    reconciler.apply({t.MAP_DST: {}, t.MAP_LOCAL: {}, t.MAP_DENY: {}, t.MAP_PODS: {}})
    assert all(not m.entries for m in maps.values())


def test_reconcile_a_new_daemon_keeps_the_previous_daemons_pods_until_the_snapshot() -> None:
    """Restart or handover: pods not replayed yet stay captured (fail closed), and only the
    snapshot decides which of them are gone."""
    state = ProxyState()
    state.apply(UpdateBatch(workloads=(hbone("a", "10.0.0.5"), hbone("b", "10.0.0.6"))))
    maps = fake_maps()
    old = MapSync(state, Reconciler(maps))
    old.enroll(EnrolledPod("pod-a", 7, (ip("10.0.0.5"),), "a"))
    old.enroll(EnrolledPod("pod-b", 8, (ip("10.0.0.6"),), "b"))
    left_behind = contents(maps)

    new = MapSync(state, Reconciler(maps))  # the next daemon, same pinned maps
    new.reconciler.resync()
    assert new.inherit() == 2
    assert new.inherited == {7, 8}
    new.enroll(EnrolledPod("pod-a", 7, (ip("10.0.0.5"),), "a"))  # replayed first
    assert contents(maps) == left_behind  # pod-b was not touched meanwhile
    assert pod_key(8) in maps[t.MAP_PODS].entries

    # The snapshot names only pod-a: pod-b is gone, so its entries go too.
    new.release_inherited(keep=())
    assert pod_key(8) not in maps[t.MAP_PODS].entries
    assert local_key(8, ip("10.0.0.6")) not in maps[t.MAP_LOCAL].entries
    assert pod_key(7) in maps[t.MAP_PODS].entries


def test_reconcile_release_keeps_pods_held_but_not_enrolled_yet() -> None:
    state = ProxyState()
    state.apply(UpdateBatch(workloads=(hbone("a", "10.0.0.5"),)))
    maps = fake_maps()
    MapSync(state, Reconciler(maps)).enroll(EnrolledPod("pod-a", 7, (ip("10.0.0.5"),), "a"))
    new = MapSync(state, Reconciler(maps))
    new.reconciler.resync()
    new.inherit()
    new.release_inherited(keep={7})  # pending in the workload manager: still captured
    assert pod_key(7) in maps[t.MAP_PODS].entries
    assert new.inherited == {7}


def test_reconcile_empty_changeset_does_nothing() -> None:
    maps = fake_maps()
    sync = MapSync(ProxyState(), Reconciler(maps))
    state = ProxyState()
    assert sync.state_changed(state.apply(UpdateBatch())) is None


def test_reconcile_projects_mesh_destinations_again_only_after_address_changes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    projections = []

    def counting(state: ProxyState, *, network: str = "") -> dict[bytes, bytes]:
        projections.append(state.generation)
        return mesh_destinations(state, network=network)

    monkeypatch.setattr(reconcile, "mesh_destinations", counting)
    maps = fake_maps()
    state = ProxyState()
    state.apply(UpdateBatch(workloads=(hbone("a", "10.0.0.5"),)))
    sync = MapSync(state, Reconciler(maps))
    sync.enroll(EnrolledPod("pod-a", 7, (ip("10.0.0.5"),), "a"))
    sync.enroll(EnrolledPod("pod-b", 8, (), None))
    sync.unenroll("pod-b")
    deny = Authorization(name="d", namespace="ns", action=Action.DENY, rules=(((Match(),),),))
    sync.state_changed(state.apply(UpdateBatch(policies=(deny,))))
    assert projections == [1]  # pods and policies leave the mesh destinations as they were

    sync.state_changed(state.apply(UpdateBatch(workloads=(hbone("b", "10.0.0.6"),))))
    assert projections == [1, 3]
    assert dst_key(ip("10.0.0.6"), 0) in maps[t.MAP_DST].entries
    sync.state_changed(None)  # "unknown": project everything again
    assert projections == [1, 3, 3]


# ------------------------------------------------------------------ random churn


class Churn:
    """Random but reproducible changes to workloads, services, policies and pods."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.ips = [f"10.0.{i // 250}.{i % 250 + 1}" for i in range(40)]
        self.vips = [f"10.96.0.{i}" for i in range(1, 12)] + ["fd00:96::1", "fd00:96::2"]

    def workload(self) -> Workload:
        rng = self.rng
        uid = f"w{rng.randrange(20)}"
        services = {}
        for _ in range(rng.randrange(3)):
            services[f"ns/svc{rng.randrange(8)}.ns.svc"] = frozen_map({80: 8080})
        return Workload(
            uid=uid,
            name=uid,
            namespace="ns",
            workload_ips=tuple(ip(a) for a in rng.sample(self.ips, rng.randrange(1, 3))),
            protocol=rng.choice([InboundProtocol.HBONE, InboundProtocol.TCP]),
            network=rng.choice(["", "", "", "west"]),
            services=frozen_map(services),
            authorization_policies=tuple(
                f"ns/p{rng.randrange(4)}" for _ in range(rng.randrange(2))
            ),
        )

    def service(self) -> Service:
        rng = self.rng
        n = rng.randrange(8)
        waypoint = GatewayAddress(destination=NetworkAddress("", ip("10.0.9.9")))
        return Service(
            name=f"svc{n}",
            namespace="ns",
            hostname=f"svc{n}.ns.svc",
            vips=tuple(NetworkAddress("", ip(v)) for v in rng.sample(self.vips, rng.randrange(3))),
            ports=frozen_map({p: p for p in rng.sample([80, 443, 9090], rng.randrange(3))}),
            waypoint=waypoint if rng.random() < 0.2 else None,
            cidr_vips=tuple(
                CidrVip(rng.choice(["", "", "west"]), ipaddress.ip_network(c))
                for c in rng.sample(
                    ["10.200.0.0/16", "10.200.1.0/24", "fd00:200::/64"], rng.randrange(3)
                )
            ),
        )

    def policy(self) -> Authorization:
        rng = self.rng
        matches = []
        for _ in range(rng.randrange(1, 3)):
            nets = rng.sample(
                ["192.168.0.0/16", "10.0.0.0/8", "fd00::/8", "1.2.3.4/32"], rng.randrange(2)
            )
            ports = rng.sample([80, 443, 8080], rng.randrange(2))
            matches.append(
                Match(
                    source_ips=tuple(ipaddress.ip_network(n) for n in nets),
                    destination_ports=tuple(ports),
                )
            )
        return Authorization(
            name=f"p{rng.randrange(4)}",
            namespace="ns",
            scope=rng.choice([Scope.NAMESPACE, Scope.WORKLOAD_SELECTOR, Scope.GLOBAL]),
            action=rng.choice([Action.DENY, Action.DENY, Action.ALLOW]),
            rules=((tuple(matches),),),
        )

    def batch(self) -> UpdateBatch:
        rng = self.rng
        kind = rng.randrange(6)
        if kind == 0:
            return UpdateBatch(workloads=tuple(self.workload() for _ in range(rng.randrange(1, 4))))
        if kind == 1:
            return UpdateBatch(services=(self.service(),))
        if kind == 2:
            return UpdateBatch(policies=(self.policy(),))
        if kind == 3:
            return UpdateBatch(removed_policies=(f"ns/p{rng.randrange(4)}",))
        names = [f"w{rng.randrange(20)}", f"ns/svc{rng.randrange(8)}.ns.svc"]
        return UpdateBatch(removed_addresses=(rng.choice(names),))

    def pod(self) -> EnrolledPod:
        rng = self.rng
        n = rng.randrange(10)
        return EnrolledPod(
            uid=f"pod{n}",
            netns_cookie=(n + 1) << rng.choice([0, 33]),  # some cookies above 2**32
            ips=tuple(ip(a) for a in rng.sample(self.ips, rng.randrange(3))),
            workload_uid=rng.choice([None, f"w{rng.randrange(20)}"]),
        )


def test_reconcile_maps_equal_projection_after_1000_random_changes() -> None:
    rng = random.Random(20240611)
    churn = Churn(rng)
    journal: Journal = []
    maps = fake_maps(journal=journal)
    state = ProxyState()
    sync = MapSync(state, Reconciler(maps))
    pod_changes = 0
    most = dict.fromkeys(maps, 0)
    for _ in range(1000):
        before = {name: set(m.entries) for name, m in maps.items()}
        journal.clear()
        roll = rng.random()
        if roll < 0.25:
            sync.enroll(churn.pod())
            pod_changes += 1
        elif roll < 0.35 and sync.pods:
            sync.unenroll(rng.choice(sorted(sync.pods)))
            pod_changes += 1
        else:
            sync.state_changed(state.apply(churn.batch()))
        desired = project(state, sync.pods.values())
        assert contents(maps) == desired
        assert sync.reconciler.applied == desired
        check_order(before, journal, desired)
        for name, m in maps.items():
            most[name] = max(most[name], len(m.entries))
    # The run exercised every map and many enrolls/unenrolls.
    assert pod_changes > 200
    assert all(n > 3 for n in most.values()), most
