"""ProxyState semantics: lookups, endpoints, removals, VIP collisions, policy scopes."""

from __future__ import annotations

import ipaddress
from typing import Any

from ztunnel_py.rbac.model import Action, Authorization, Scope
from ztunnel_py.state.model import (
    CidrVip,
    NetworkAddress,
    NetworkMode,
    Service,
    Visibility,
    Workload,
    frozen_map,
)
from ztunnel_py.state.store import ProxyState, UpdateBatch


def ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return ipaddress.ip_address(text)


def addr(text: str, network: str = "") -> NetworkAddress:
    return NetworkAddress(network, ip(text))


def wl(
    name: str, ns: str = "default", ips: tuple[str, ...] = ("10.0.0.1",), **kw: object
) -> Workload:
    return Workload(
        uid=f"c//Pod/{ns}/{name}",
        name=name,
        namespace=ns,
        workload_ips=tuple(ip(i) for i in ips),
        **kw,  # type: ignore[arg-type]
    )


def svc(
    name: str, ns: str = "default", vips: tuple[str, ...] = ("10.96.0.1",), **kw: object
) -> Service:
    return Service(
        name=name,
        namespace=ns,
        hostname=f"{name}.{ns}.svc.cluster.local",
        vips=tuple(addr(v) for v in vips),
        ports=frozen_map({80: 8080}),
        **kw,  # type: ignore[arg-type]
    )


def members(service_key: str, ports: dict[int, int] | None = None) -> dict[str, Any]:
    return {"services": frozen_map({service_key: frozen_map(ports or {80: 8080})})}


def test_workload_lookup_by_uid_and_address() -> None:
    state = ProxyState()
    a = wl("a", ips=("10.0.0.1", "fd00::1"))
    changes = state.apply(UpdateBatch(workloads=(a,)))
    assert changes.workloads_upserted == {a.uid}
    assert changes.generation == 1
    assert state.workload(a.uid) == a
    assert state.workload_by_address(addr("10.0.0.1")) == a
    assert state.workload_by_address(addr("fd00::1")) == a
    assert state.workload_by_address(addr("10.0.0.1", network="other")) is None
    assert state.workload_by_ip("", ip("10.0.0.2")) is None


def test_host_network_workloads_are_not_indexed_by_ip() -> None:
    state = ProxyState()
    h = wl("node-agent", ips=("192.168.0.10",), network_mode=NetworkMode.HOST_NETWORK)
    state.apply(UpdateBatch(workloads=(h,)))
    assert state.workload(h.uid) == h
    assert state.workload_by_address(addr("192.168.0.10")) is None


def test_changing_a_workload_ip_moves_its_index() -> None:
    state = ProxyState()
    state.apply(UpdateBatch(workloads=(wl("a", ips=("10.0.0.1",)),)))
    state.apply(UpdateBatch(workloads=(wl("a", ips=("10.0.0.2",)),)))
    assert state.workload_by_address(addr("10.0.0.1")) is None
    assert state.workload_by_address(addr("10.0.0.2")).name == "a"  # type: ignore[union-attr]


def test_reapplying_the_same_content_changes_nothing() -> None:
    state = ProxyState()
    batch = UpdateBatch(workloads=(wl("a"),), services=(svc("s"),))
    state.apply(batch)
    again = state.apply(batch)
    assert again.is_empty
    assert again.generation == 2


def test_service_lookup_by_key_hostname_and_vip() -> None:
    state = ProxyState()
    s = svc("reviews", "backend", vips=("10.96.0.20", "fd00:96::20"))
    state.apply(UpdateBatch(services=(s,)))
    assert state.service("backend/reviews.backend.svc.cluster.local") == s
    assert state.service_by_hostname("reviews.backend.svc.cluster.local") == s
    assert state.service_by_vip(addr("10.96.0.20")) == s
    assert state.service_by_vip(addr("fd00:96::20")) == s
    assert state.service_by_vip(addr("10.96.0.21")) is None


def test_endpoints_follow_workload_services_in_any_order() -> None:
    state = ProxyState()
    key = "default/s.default.svc.cluster.local"
    a = wl("a", ips=("10.0.0.1",), **members(key))
    # The workload arrives first: its endpoint is staged until the service exists.
    changes = state.apply(UpdateBatch(workloads=(a,)))
    assert changes.endpoints_changed == {key}
    assert key in state.staged_services()
    state.apply(UpdateBatch(services=(svc("s"),)))
    assert key not in state.staged_services()
    assert set(state.endpoints(key)) == {a.uid}
    assert state.endpoints(key)[a.uid].ports == {80: 8080}


def test_endpoint_changes_and_removal() -> None:
    state = ProxyState()
    key = "default/s.default.svc.cluster.local"
    a = wl("a", ips=("10.0.0.1",), **members(key))
    b = wl("b", ips=("10.0.0.2",), **members(key))
    state.apply(UpdateBatch(services=(svc("s"),), workloads=(a, b)))
    assert set(state.endpoints(key)) == {a.uid, b.uid}
    # b leaves the service (its services map changes) ...
    changes = state.apply(UpdateBatch(workloads=(wl("b", ips=("10.0.0.2",)),)))
    assert changes.endpoints_changed == {key}
    assert set(state.endpoints(key)) == {a.uid}
    # ... and a changes its target port.
    state.apply(UpdateBatch(workloads=(wl("a", ips=("10.0.0.1",), **members(key, {80: 9090})),)))
    assert state.endpoints(key)[a.uid].ports == {80: 9090}
    # Removing a by uid drops its endpoint and its address.
    changes = state.apply(UpdateBatch(removed_addresses=(a.uid,)))
    assert changes.workloads_removed == {a.uid}
    assert changes.endpoints_changed == {key}
    assert state.endpoints(key) == {}
    assert state.workload_by_address(addr("10.0.0.1")) is None


def test_removal_name_can_be_a_service_key() -> None:
    state = ProxyState()
    s = svc("s")
    state.apply(UpdateBatch(services=(s,)))
    changes = state.apply(UpdateBatch(removed_addresses=(s.key, "unknown/name")))
    assert changes.services_removed == {s.key}
    assert state.service(s.key) is None
    assert state.service_by_vip(addr("10.96.0.1")) is None
    assert state.service_by_hostname(s.hostname) is None


def test_vip_collision_across_namespaces_prefers_the_client_namespace() -> None:
    state = ProxyState()
    blue = svc("db", "blue", vips=("10.96.0.9",))
    green = svc("db", "green", vips=("10.96.0.9",))
    state.apply(UpdateBatch(services=(blue, green)))
    vip = addr("10.96.0.9")
    assert {s.namespace for s in state.services_by_vip(vip)} == {"blue", "green"}
    assert state.service_by_vip(vip, prefer_namespace="green") == green
    assert state.service_by_vip(vip, prefer_namespace="blue") == blue
    assert state.service_by_vip(vip, prefer_namespace="other") == blue  # first arrival
    # Removing one keeps the other reachable at the shared VIP.
    state.apply(UpdateBatch(removed_addresses=(blue.key,)))
    assert state.service_by_vip(vip, prefer_namespace="blue") == green


def test_hostname_lookup_prefers_client_namespace_then_canonical() -> None:
    state = ProxyState()
    a = Service(name="x", namespace="a", hostname="x.example.com")
    b = Service(name="x", namespace="b", hostname="x.example.com", canonical=True)
    state.apply(UpdateBatch(services=(a, b)))
    assert state.service_by_hostname("x.example.com", prefer_namespace="a") == a
    assert state.service_by_hostname("x.example.com", prefer_namespace="c") == b


def test_find_address_prefers_workload_ip_over_vip() -> None:
    state = ProxyState()
    w = wl("a", ips=("10.0.0.5",))
    s = svc("s", vips=("10.0.0.5",))
    state.apply(UpdateBatch(workloads=(w,), services=(s,)))
    assert state.find_address(addr("10.0.0.5")) == w
    state.apply(UpdateBatch(removed_addresses=(w.uid,)))
    assert state.find_address(addr("10.0.0.5")) == s


def test_replace_removes_what_the_new_batch_does_not_name() -> None:
    state = ProxyState()
    state.apply(UpdateBatch(workloads=(wl("a"), wl("b", ips=("10.0.0.2",))), services=(svc("s"),)))
    changes = state.apply(UpdateBatch(workloads=(wl("a"),), replace=True))
    assert changes.workloads_removed == {"c//Pod/default/b"}
    assert changes.services_removed == {"default/s.default.svc.cluster.local"}
    assert [w.name for w in state.workloads()] == ["a"]


def test_policy_scopes_form_the_applicable_set() -> None:
    state = ProxyState()
    glob = Authorization(name="g", namespace="istio-system", scope=Scope.GLOBAL, action=Action.DENY)
    ns_a = Authorization(name="n", namespace="a", scope=Scope.NAMESPACE)
    ns_b = Authorization(name="n", namespace="b", scope=Scope.NAMESPACE)
    sel = Authorization(name="s", namespace="a", scope=Scope.WORKLOAD_SELECTOR)
    unused_sel = Authorization(name="t", namespace="a", scope=Scope.WORKLOAD_SELECTOR)
    w = wl("a", ns="a", authorization_policies=("a/s", "a/missing"))
    changes = state.apply(UpdateBatch(policies=(glob, ns_a, ns_b, sel, unused_sel), workloads=(w,)))
    assert changes.policies_upserted == {"istio-system/g", "a/n", "b/n", "a/s", "a/t"}
    assert changes.policies_changed
    assert {p.key for p in state.policies_for(w)} == {"istio-system/g", "a/n", "a/s"}
    # Changing a policy's scope moves it between indexes.
    state.apply(UpdateBatch(policies=(Authorization(name="n", namespace="b", scope=Scope.GLOBAL),)))
    assert "b/n" in {p.key for p in state.policies_for(w)}
    changes = state.apply(UpdateBatch(removed_policies=("istio-system/g", "b/n")))
    assert changes.policies_removed == {"istio-system/g", "b/n"}
    assert {p.key for p in state.policies_for(w)} == {"a/n", "a/s"}


def test_find_workload_by_pod_info() -> None:
    state = ProxyState()
    w = wl("pod-1", ns="ns", service_account="sa")
    state.apply(UpdateBatch(workloads=(w,)))
    assert state.find_workload(namespace="ns", name="pod-1", service_account="sa") == w
    assert state.find_workload(namespace="ns", name="pod-1", service_account="other") is None
    assert state.workloads_on_node("") == [w]


def test_batch_is_empty_only_without_changes_and_without_replace() -> None:
    assert UpdateBatch().is_empty
    assert not UpdateBatch(removed_policies=("default/p",)).is_empty
    assert not UpdateBatch(replace=True).is_empty  # the whole state: it removes everything


# ------------------------------------------------------------------ CIDR VIPs (get_best_by_vip)


def cidr_svc(name: str, ns: str = "default", *cidrs: str, **kw: object) -> Service:
    prefixes = tuple(CidrVip("", ipaddress.ip_network(c)) for c in cidrs)
    return svc(name, ns, vips=(), cidr_vips=prefixes, **kw)


def test_cidr_vip_contains_the_address_v4_and_v6() -> None:
    state = ProxyState()
    state.apply(UpdateBatch(services=(cidr_svc("dual", "ns", "10.0.0.0/24", "fd00::/112"),)))
    assert state.service_by_vip(addr("10.0.0.5")) is not None
    assert state.service_by_vip(addr("10.0.0.255")) is not None
    assert state.service_by_vip(addr("fd00::ffff")) is not None
    assert state.service_by_vip(addr("10.0.1.5")) is None
    assert state.service_by_vip(addr("fd00::1:0")) is None
    assert state.service_by_vip(addr("fd01::5")) is None


def test_cidr_vip_never_matches_the_other_family() -> None:
    state = ProxyState()
    state.apply(UpdateBatch(services=(cidr_svc("v6", "ns", "fd00::/8"),)))
    assert state.service_by_vip(addr("253.0.0.5")) is None  # 0xfd... as an IPv4 address


def test_cidr_vip_is_per_network() -> None:
    state = ProxyState()
    state.apply(UpdateBatch(services=(cidr_svc("svc", "ns", "10.0.0.0/24"),)))
    assert state.service_by_vip(addr("10.0.0.5", network="other")) is None


def test_longest_cidr_prefix_wins_whatever_the_arrival_order() -> None:
    for order in ((16, 24), (24, 16)):
        state = ProxyState()
        by_len = {
            16: cidr_svc("wide", "ns", "10.0.0.0/16"),
            24: cidr_svc("narrow", "ns", "10.0.0.0/24"),
        }
        state.apply(UpdateBatch(services=tuple(by_len[n] for n in order)))
        assert state.service_by_vip(addr("10.0.0.5")) == by_len[24]
        assert state.service_by_vip(addr("10.0.1.5")) == by_len[16]
    state = ProxyState()
    wide, narrow = cidr_svc("wide", "ns", "fd00::/48"), cidr_svc("narrow", "ns", "fd00::/112")
    state.apply(UpdateBatch(services=(wide, narrow)))
    assert state.service_by_vip(addr("fd00::5")) == narrow
    assert state.service_by_vip(addr("fd00::1:0")) == wide


def test_cidr_rank_is_namespace_then_prefix_then_canonical_then_arrival() -> None:
    state = ProxyState()
    mine_wide = cidr_svc("mine", "client", "10.0.0.0/8")
    other_narrow = cidr_svc("other", "elsewhere", "10.0.0.0/24")
    other_narrow_canonical = cidr_svc("canon", "elsewhere", "10.0.0.0/24", canonical=True)
    first_tie = cidr_svc("tie-a", "third", "10.9.0.0/16")
    second_tie = cidr_svc("tie-b", "third", "10.9.0.0/16")
    state.apply(
        UpdateBatch(
            services=(mine_wide, other_narrow, other_narrow_canonical, first_tie, second_tie)
        )
    )
    # A shorter prefix in the client's namespace beats a longer one elsewhere (ztunnel's rank).
    assert state.service_by_vip(addr("10.0.0.5"), prefer_namespace="client") == mine_wide
    # Without the namespace: longest prefix, and at equal length the canonical service.
    assert state.service_by_vip(addr("10.0.0.5"), prefer_namespace="x") == other_narrow_canonical
    assert state.service_by_vip(addr("10.9.0.5")) == first_tie


def test_host_vip_beats_a_cidr_that_contains_it() -> None:
    state = ProxyState()
    host = svc("host", "ns", vips=("10.0.0.5",))
    state.apply(UpdateBatch(services=(cidr_svc("range", "ns", "10.0.0.0/24"), host)))
    assert state.service_by_vip(addr("10.0.0.5")) == host
    assert state.service_by_vip(addr("10.0.0.6")).name == "range"  # type: ignore[union-attr]


def test_updating_or_removing_a_service_updates_its_cidrs() -> None:
    state = ProxyState()
    state.apply(UpdateBatch(services=(cidr_svc("svc", "ns", "10.0.0.0/24"),)))
    moved = cidr_svc("svc", "ns", "10.1.0.0/24")
    state.apply(UpdateBatch(services=(moved,)))
    assert state.service_by_vip(addr("10.0.0.5")) is None
    assert state.service_by_vip(addr("10.1.0.5")) == moved
    state.apply(UpdateBatch(removed_addresses=(moved.key,)))
    assert state.service_by_vip(addr("10.1.0.5")) is None


def test_namespace_visibility_hides_host_and_cidr_vips_from_other_namespaces() -> None:
    state = ProxyState()
    local = svc("local", "ns-a", vips=("10.2.0.5",), visibility=Visibility.NAMESPACE)
    local_range = cidr_svc("lrange", "ns-a", "10.1.0.0/16", visibility=Visibility.NAMESPACE)
    public_range = cidr_svc("prange", "ns-b", "10.2.0.0/16")
    state.apply(UpdateBatch(services=(local, local_range, public_range)))
    assert state.service_by_vip(addr("10.2.0.5"), prefer_namespace="ns-a") == local
    # Hidden exact VIP: the lookup falls through to a visible CIDR, not to nothing.
    assert state.service_by_vip(addr("10.2.0.5"), prefer_namespace="ns-b") == public_range
    assert state.service_by_vip(addr("10.1.0.5"), prefer_namespace="ns-a") == local_range
    assert state.service_by_vip(addr("10.1.0.5"), prefer_namespace="ns-b") is None
    # No client namespace (the inbound path): nothing is filtered.
    assert state.service_by_vip(addr("10.1.0.5")) == local_range
