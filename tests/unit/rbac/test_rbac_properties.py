"""Properties of ``evaluate`` and the kernel DENY plan, over generated policies and connections.

Values come from small pools (a few addresses, ports, namespaces) so that generated policies
match generated connections often enough for the properties to bite.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

from hypothesis import given
from hypothesis import strategies as st

from ztunnel_py.ip import IPNetwork
from ztunnel_py.rbac.evaluate import (
    ConnectionInfo,
    canonical_ip,
    evaluate,
    policy_matches,
)
from ztunnel_py.rbac.kernel import compile_kernel_denies
from ztunnel_py.rbac.model import (
    Action,
    Authorization,
    Match,
    Rule,
    Scope,
    ServiceAccountMatch,
    StringMatch,
    StringMatchKind,
)
from ztunnel_py.state.model import IPAddress, Workload
from ztunnel_py.state.store import ProxyState, UpdateBatch

V4 = [ipaddress.IPv4Address(f"10.0.0.{i}") for i in range(8)]
V6 = [ipaddress.IPv6Address(f"fd00::{i}") for i in range(4)]
ADDRESSES: list[IPAddress] = [*V4, *V6]
NETWORKS: list[IPNetwork] = [
    *(ipaddress.ip_network(f"{a}/32") for a in V4[:4]),
    ipaddress.ip_network("10.0.0.0/30"),
    ipaddress.ip_network("10.0.0.4/30"),
    ipaddress.ip_network("10.0.0.0/29"),
    ipaddress.ip_network("10.0.0.0/8"),
    ipaddress.ip_network("0.0.0.0/0"),
    ipaddress.ip_network("fd00::/126"),
    ipaddress.ip_network("fd00::1/128"),
    ipaddress.ip_network("::/0"),
]
# Outside every pooled network but the /0s and 10/8: where complements and disjoint CIDRs show.
OUTSIDE_V4 = [ipaddress.IPv4Address(a) for a in ("10.0.0.9", "10.1.0.1", "192.168.1.1")]
OUTSIDE_V6 = [ipaddress.IPv6Address(a) for a in ("fd00::9", "2001:db8::1")]
PORTS = [80, 443, 8080, 9090]
NAMESPACES = ["ns1", "ns2", "ns3"]
IDENTITIES = [
    f"spiffe://{td}/ns/{ns}/sa/{sa}"
    for td in ("cluster.local", "other.td")
    for ns in NAMESPACES[:2]
    for sa in ("default", "sa1")
]

ips = st.sampled_from(ADDRESSES)
ports = st.sampled_from(PORTS)
identities = st.none() | st.sampled_from(IDENTITIES)


@st.composite
def connections(draw: st.DrawFn, *, plaintext: bool = False) -> ConnectionInfo:
    src = draw(ips)
    # Same family on both ends, as on a real socket.
    same_family: list[IPAddress] = list(V4) if src.version == 4 else list(V6)
    dst = draw(st.sampled_from(same_family))
    if src.version == 4 and draw(st.booleans()):
        src = ipaddress.IPv6Address(f"::ffff:{src}")  # as a dual-stack socket reports it
    return ConnectionInfo(
        src_ip=src,
        src_port=draw(st.integers(1024, 65535)),
        dst_ip=dst,
        dst_port=draw(ports),
        src_identity=None if plaintext else draw(identities),
    )


def small(elements: st.SearchStrategy[object]) -> st.SearchStrategy[tuple[object, ...]]:
    return st.lists(elements, max_size=2).map(tuple)


string_matches = st.builds(
    StringMatch,
    st.sampled_from(list(StringMatchKind)),
    st.sampled_from(["", "ns1", "ns", "1", "cluster.local/ns/ns1/sa/sa1", "cluster.local/"]),
)
sa_matches = st.builds(
    ServiceAccountMatch, st.sampled_from(NAMESPACES), st.sampled_from(["default", "sa1"])
)
networks = st.sampled_from(NETWORKS)


L4_FIELDS: dict[str, st.SearchStrategy[tuple[object, ...]]] = {
    "source_ips": small(networks),
    "not_source_ips": small(networks),
    "destination_ips": small(networks),
    "not_destination_ips": small(networks),
    "destination_ports": small(ports),
}
IDENTITY_FIELDS: dict[str, st.SearchStrategy[tuple[object, ...]]] = {
    "namespaces": small(string_matches),
    "not_namespaces": small(string_matches),
    "principals": small(string_matches),
    "not_principals": small(string_matches),
    "service_accounts": small(sa_matches),
    "not_service_accounts": small(sa_matches),
}


@st.composite
def matches(draw: st.DrawFn, *, l4_only: bool = False, negated_ports: bool = True) -> Match:
    fields = dict(L4_FIELDS)
    if negated_ports:
        fields["not_destination_ports"] = small(ports)
    if not l4_only:
        fields.update(IDENTITY_FIELDS)
    # Few fields per match, so that matches stay satisfiable.
    keep = draw(st.sets(st.sampled_from(sorted(fields)), max_size=3))
    return Match(**{k: draw(fields[k]) for k in sorted(keep)})  # type: ignore[arg-type]


def rules(match_strategy: st.SearchStrategy[Match]) -> st.SearchStrategy[tuple[Rule, ...]]:
    clause = st.lists(match_strategy, max_size=2).map(tuple)
    rule = st.lists(clause, max_size=3).map(tuple)
    return st.lists(rule, max_size=2).map(tuple)


@st.composite
def policy_lists(
    draw: st.DrawFn,
    *,
    actions: Sequence[Action] = (Action.ALLOW, Action.DENY),
    match_strategy: st.SearchStrategy[Match] | None = None,
    dry_run: bool = True,
    max_size: int = 4,
) -> list[Authorization]:
    count = draw(st.integers(0, max_size))
    return [
        Authorization(
            name=f"p{i}",
            namespace="ns1",
            action=draw(st.sampled_from(actions)),
            rules=draw(rules(match_strategy if match_strategy is not None else matches())),
            dry_run=draw(st.booleans()) if dry_run else False,
        )
        for i in range(count)
    ]


# --- evaluate ---------------------------------------------------------------------------------


@given(
    policy_lists(), policy_lists(actions=[Action.DENY], dry_run=False, max_size=1), connections()
)
def test_a_matching_deny_always_denies(
    others: list[Authorization], denies: list[Authorization], conn: ConnectionInfo
) -> None:
    extra = [
        Authorization(name=f"d{i}", namespace="ns1", action=Action.DENY, rules=p.rules)
        for i, p in enumerate(denies)
    ]
    if any(policy_matches(p, conn) for p in extra):
        assert not evaluate(conn, [*others, *extra]).allowed


@given(policy_lists(), connections())
def test_a_deny_built_to_match_always_denies(
    others: list[Authorization], conn: ConnectionInfo
) -> None:
    # A DENY whose only match pins this very connection's source and port.
    src = ipaddress.ip_network(canonical_ip(conn.src_ip))
    pin = Match(source_ips=(src,), destination_ports=(conn.dst_port,))
    deny = Authorization(name="pin", namespace="ns1", action=Action.DENY, rules=(((pin,),),))
    decision = evaluate(conn, [*others, deny])
    assert not decision.allowed
    assert decision.policy is not None
    assert decision.reason == f"denied by policy {decision.policy}"


@given(policy_lists(), connections())
def test_without_enforced_allow_everything_not_denied_is_allowed(
    pols: list[Authorization], conn: ConnectionInfo
) -> None:
    pols = [p for p in pols if p.action is Action.DENY or p.dry_run]
    denied = any(
        p.action is Action.DENY and not p.dry_run and policy_matches(p, conn) for p in pols
    )
    assert evaluate(conn, pols).allowed is not denied


@given(policy_lists(), connections())
def test_dry_run_policies_never_change_the_decision(
    pols: list[Authorization], conn: ConnectionInfo
) -> None:
    enforced = [p for p in pols if not p.dry_run]
    full = evaluate(conn, pols)
    assert (full.allowed, full.policy) == (
        evaluate(conn, enforced).allowed,
        evaluate(conn, enforced).policy,
    )
    # ...and dry_run_denied is what enforcing them would have decided.
    as_enforced = [
        Authorization(name=p.name, namespace=p.namespace, action=p.action, rules=p.rules)
        for p in pols
    ]
    assert full.dry_run_denied is (not evaluate(conn, as_enforced).allowed)


def _state(policies: list[Authorization], selected: tuple[str, ...]) -> tuple[ProxyState, Workload]:
    workload = Workload(
        uid="w",
        name="w",
        namespace="ns1",
        workload_ips=(V4[2],),
        authorization_policies=selected,
    )
    state = ProxyState()
    state.apply(UpdateBatch(workloads=(workload,), policies=tuple(policies)))
    return state, workload


@st.composite
def scoped_policies(draw: st.DrawFn) -> tuple[list[Authorization], tuple[str, ...]]:
    pols = draw(policy_lists())
    scoped = []
    for p in pols:
        scope = draw(st.sampled_from(list(Scope)))
        scoped.append(
            Authorization(
                name=p.name,
                namespace="istio-system" if scope is Scope.GLOBAL else "ns1",
                scope=scope,
                action=p.action,
                rules=p.rules,
                dry_run=p.dry_run,
            )
        )
    selected = tuple(p.key for p in scoped if p.scope is Scope.WORKLOAD_SELECTOR)
    return scoped, selected


@given(
    scoped_policies(),
    rules(matches()),
    st.sampled_from([Action.ALLOW, Action.DENY]),
    st.sampled_from(["other-namespace", "unreferenced-selector"]),
    connections(),
)
def test_an_unrelated_policy_never_changes_a_decision(
    scoped: tuple[list[Authorization], tuple[str, ...]],
    unrelated_rules: tuple[Rule, ...],
    action: Action,
    kind: str,
    conn: ConnectionInfo,
) -> None:
    pols, selected = scoped
    if kind == "other-namespace":
        unrelated = Authorization(
            name="u", namespace="ns2", scope=Scope.NAMESPACE, action=action, rules=unrelated_rules
        )
    else:
        unrelated = Authorization(
            name="u",
            namespace="ns1",
            scope=Scope.WORKLOAD_SELECTOR,
            action=action,
            rules=unrelated_rules,
        )
    before_state, workload = _state(pols, selected)
    after_state, _ = _state([*pols, unrelated], selected)
    before = evaluate(conn, before_state.policies_for(workload))
    after = evaluate(conn, after_state.policies_for(workload))
    assert after == before


# --- kernel plan vs evaluate (plaintext) ------------------------------------------------------
# Each generated policy set is checked against every pooled source and port, so that a wrong
# plan cannot hide behind one unlucky connection.


def _plaintext_grid(dst: IPAddress) -> list[ConnectionInfo]:
    sources: list[IPAddress] = list(V4 + OUTSIDE_V4 if dst.version == 4 else V6 + OUTSIDE_V6)
    if dst.version == 4:
        sources.append(ipaddress.IPv6Address(f"::ffff:{V4[1]}"))
    return [
        ConnectionInfo(src_ip=src, src_port=40000, dst_ip=dst, dst_port=port)
        for src in sources
        for port in [*PORTS, 1]
    ]


@given(
    policy_lists(
        actions=[Action.DENY],
        match_strategy=matches(l4_only=True, negated_ports=False),
        dry_run=True,
    ),
    st.sampled_from(V4 + V6),
)
def test_kernel_plan_agrees_exactly_for_l4_deny_policies(
    pols: list[Authorization], workload_ip: IPAddress
) -> None:
    # One workload address, so destination_ips always fold to a constant.
    plan = compile_kernel_denies(pols, workload_ips=(workload_ip,))
    assert plan.complete == {p.key for p in pols if not p.dry_run}
    assert not plan.left_to_userspace
    for conn in _plaintext_grid(workload_ip):
        assert plan.denies(conn.src_ip, conn.dst_port) is (not evaluate(conn, pols).allowed), conn


@given(policy_lists(), st.lists(st.sampled_from(V4 + V6), max_size=3, unique=True))
def test_kernel_never_denies_what_userspace_allows(
    pols: list[Authorization], workload_ips: list[IPAddress]
) -> None:
    plan = compile_kernel_denies(pols, workload_ips=workload_ips)
    alone = {
        p.key: compile_kernel_denies([p], workload_ips=workload_ips)
        for p in pols
        if p.key in plan.complete
    }
    # The kernel applies the plan to connections addressed to the workload.
    for dst in workload_ips or [V4[0]]:
        for conn in _plaintext_grid(dst):
            if plan.denies(conn.src_ip, conn.dst_port):
                assert not evaluate(conn, pols).allowed, conn
            # Each fully compiled policy, taken alone, is decided identically by the kernel.
            for p in pols:
                if p.key in alone:
                    kernel = alone[p.key].denies(conn.src_ip, conn.dst_port)
                    assert kernel is (not evaluate(conn, [p]).allowed), (p, conn)


@given(
    policy_lists(
        actions=[Action.DENY],
        match_strategy=matches(l4_only=True, negated_ports=False),
        dry_run=True,
    ),
    st.sampled_from(V4),
    st.sampled_from(V6),
)
def test_kernel_plan_agrees_exactly_on_a_dual_stack_workload(
    pols: list[Authorization], ip4: IPAddress, ip6: IPAddress
) -> None:
    # One address per family: destination_ips fold to a constant per family.
    plan = compile_kernel_denies(pols, workload_ips=(ip4, ip6))
    assert plan.complete == {p.key for p in pols if not p.dry_run}
    for dst in (ip4, ip6):
        for conn in _plaintext_grid(dst):
            assert plan.denies(conn.src_ip, conn.dst_port) is (not evaluate(conn, pols).allowed), (
                conn
            )
