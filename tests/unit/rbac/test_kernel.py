"""Which DENY shapes compile to kernel rules, which stay in userspace, and what they compile to."""

# ruff: noqa: E501  (tables: one case per line reads better than wrapped YAML)

from __future__ import annotations

import ipaddress

import pytest

from ztunnel_py.rbac.kernel import (
    MAX_RULES_PER_POLICY_RULE,
    KernelDenyRule,
    compile_kernel_denies,
)
from ztunnel_py.rbac.model import Authorization
from ztunnel_py.state.store import ProxyState
from ztunnel_py.xds.local import parse_local_config

WORKLOAD_IPS = (ipaddress.ip_address("10.0.0.2"),)
net = ipaddress.ip_network


def deny(
    rules: str, *, name: str = "d", dry_run: bool = False, action: str = "Deny"
) -> Authorization:
    doc = (
        f"policies:\n  - {{name: {name}, namespace: ns1, action: {action},"
        f" dryRun: {str(dry_run).lower()}, rules: {rules}}}\n"
    )
    (policy,) = parse_local_config(doc).policies
    return policy


def rules_of(rules: str) -> set[KernelDenyRule]:
    plan = compile_kernel_denies([deny(rules)], workload_ips=WORKLOAD_IPS)
    assert plan.complete == {"ns1/d"}, plan.left_to_userspace
    return set(plan.rules)


@pytest.mark.parametrize(
    ("rules", "expected"),
    [
        pytest.param("[]", set(), id="zero-rule DENY compiles to nothing"),
        pytest.param("[[]]", {KernelDenyRule(None, None)}, id="rule without clauses denies all"),
        pytest.param("[[[]]]", {KernelDenyRule(None, None)}, id="clause without matches denies all"),
        pytest.param("[[[{}]]]", set(), id="empty Match compiles to nothing"),
        pytest.param(
            "[[[{sourceIps: [10.1.0.0/16, 10.2.0.0/16]}]]]",
            {KernelDenyRule(net("10.1.0.0/16"), None), KernelDenyRule(net("10.2.0.0/16"), None)},
            id="source_ips: one rule per CIDR",
        ),
        pytest.param(
            "[[[{destinationPorts: [80, 443]}]]]",
            {KernelDenyRule(None, 80), KernelDenyRule(None, 443)},
            id="destination_ports: one rule per port",
        ),
        pytest.param(
            "[[[{sourceIps: [10.1.0.0/16], destinationPorts: [80, 443]}]]]",
            {KernelDenyRule(net("10.1.0.0/16"), 80), KernelDenyRule(net("10.1.0.0/16"), 443)},
            id="fields of a match intersect",
        ),
        pytest.param(
            "[[[{sourceIps: [10.0.0.0/8]}], [{sourceIps: [10.1.0.0/16]}, {destinationPorts: [80]}]]]",
            {KernelDenyRule(net("10.1.0.0/16"), None), KernelDenyRule(net("10.0.0.0/8"), 80)},
            id="clauses intersect, matches unite",
        ),
        pytest.param(
            "[[[{sourceIps: [10.1.0.0/16]}], [{sourceIps: [10.2.0.0/16]}]]]", set(),
            id="disjoint CIDRs in two clauses: nothing",
        ),
        pytest.param(
            "[[[{sourceIps: [10.0.0.0/8]}]], [[{sourceIps: [10.1.0.0/16], destinationPorts: [80]}]]]",
            {KernelDenyRule(net("10.0.0.0/8"), None)},
            id="covered rules are dropped",
        ),
        pytest.param(
            "[[[{sourceIps: [10.0.0.0/30, 10.0.0.0/29], destinationPorts: [80]}]]]",
            {KernelDenyRule(net("10.0.0.0/29"), 80)},
            id="a subnet is covered by its supernet, not the reverse",
        ),
        pytest.param(
            "[[[{notSourceIps: ['0.0.0.0/1']}]]]",
            {KernelDenyRule(net("128.0.0.0/1"), None), KernelDenyRule(net("::/0"), None)},
            id="not_source_ips: exact complement in both families",
        ),
        pytest.param(
            "[[[{sourceIps: [10.0.0.0/8], notSourceIps: [10.0.0.0/9]}]]]",
            {KernelDenyRule(net("10.128.0.0/9"), None)},
            id="source_ips minus not_source_ips",
        ),
        pytest.param(
            "[[[{destinationIps: [10.0.0.0/24], destinationPorts: [80]}]]]", {KernelDenyRule(net("0.0.0.0/0"), 80)},
            id="destination_ips holding for the workload fold to true for its family",
        ),
        pytest.param(
            "[[[{destinationIps: [10.9.0.0/16]}]]]", set(),
            id="destination_ips not holding for the workload fold to false",
        ),
        pytest.param(
            "[[[{notDestinationIps: [10.0.0.2]}]]]", set(),
            id="not_destination_ips naming the workload fold to false",
        ),
    ],
)  # fmt: skip
def test_compiled_shapes(rules: str, expected: set[KernelDenyRule]) -> None:
    assert rules_of(rules) == expected


def test_not_source_ips_complement_is_exact() -> None:
    plan = compile_kernel_denies(
        [deny("[[[{notSourceIps: [10.0.0.0/8, 'fd00::/8']}]]]")], workload_ips=WORKLOAD_IPS
    )
    v4 = [r.src for r in plan.rules if r.src is not None and r.src.version == 4]
    v6 = [r.src for r in plan.rules if r.src is not None and r.src.version == 6]
    assert len(v4) == 8 and len(v6) == 8  # one CIDR per bit of the excluded prefix
    assert sum(n.num_addresses for n in v4) == 2**32 - 2**24
    assert sum(n.num_addresses for n in v6) == 2**128 - 2**120
    assert not plan.denies(ipaddress.ip_address("10.200.0.1"), 80)
    assert plan.denies(ipaddress.ip_address("11.0.0.1"), 80)
    assert plan.denies(ipaddress.ip_address("::ffff:11.0.0.1"), 80)  # compared as IPv4


@pytest.mark.parametrize(
    ("rules", "reason"),
    [
        pytest.param("[[[{notPrincipals: [{Presence: []}]}]]]", "identity (not_principals)", id="STRICT mTLS stays in userspace"),
        pytest.param("[[[{principals: [cluster.local/ns/a/sa/b]}]]]", "identity (principals)", id="principals"),
        pytest.param("[[[{namespaces: [ns1]}]]]", "identity (namespaces)", id="namespaces"),
        pytest.param("[[[{notNamespaces: [ns1]}]]]", "identity (not_namespaces)", id="not_namespaces"),
        pytest.param("[[[{serviceAccounts: [{namespace: a, serviceAccount: b}]}]]]", "identity (service_accounts)", id="service_accounts"),
        pytest.param("[[[{notServiceAccounts: [{namespace: a, serviceAccount: b}]}]]]", "identity (not_service_accounts)", id="not_service_accounts"),
        pytest.param("[[[{sourceIps: [10.0.0.0/8], principals: [x]}]]]", "identity (principals)", id="address plus identity"),
        pytest.param("[[[{notDestinationPorts: [15021]}]]]", "not_destination_ports", id="not_destination_ports"),
    ],
)  # fmt: skip
def test_shapes_left_to_userspace(rules: str, reason: str) -> None:
    plan = compile_kernel_denies([deny(rules)], workload_ips=WORKLOAD_IPS)
    assert plan.rules == ()
    assert plan.complete == frozenset()
    (why,) = plan.left_to_userspace["ns1/d"]
    assert why.startswith("rule 0:") and reason in why


DUAL_STACK = (ipaddress.ip_address("10.0.0.2"), ipaddress.ip_address("fd00::2"))


@pytest.mark.parametrize(
    ("rules", "expected"),
    [
        pytest.param("[[[{destinationIps: ['fd00::2']}]]]", {KernelDenyRule(net("::/0"), None)}, id="the IPv6 address: every IPv6 source"),
        pytest.param("[[[{destinationIps: [10.0.0.0/8], destinationPorts: [80]}]]]", {KernelDenyRule(net("0.0.0.0/0"), 80)}, id="the IPv4 address: every IPv4 source"),
        pytest.param("[[[{destinationIps: ['fd00::/64'], sourceIps: ['fd00:1::/32', 10.1.0.0/16]}]]]", {KernelDenyRule(net("fd00:1::/32"), None)}, id="IPv6 destination and sources: IPv6 sources only"),
        pytest.param("[[[{notDestinationIps: ['fd00::2']}]]]", {KernelDenyRule(net("0.0.0.0/0"), None)}, id="not the IPv6 address: every IPv4 source"),
        pytest.param("[[[{destinationIps: [10.0.0.2, 'fd00::2']}]]]", {KernelDenyRule(None, None)}, id="both: everything"),
    ],
)  # fmt: skip
def test_destination_ips_fold_per_family_on_a_dual_stack_workload(
    rules: str, expected: set[KernelDenyRule]
) -> None:
    plan = compile_kernel_denies([deny(rules)], workload_ips=DUAL_STACK)
    assert plan.complete == {"ns1/d"}, plan.left_to_userspace
    assert set(plan.rules) == expected


def test_destination_ips_that_split_one_family_of_the_workload_stay_in_userspace() -> None:
    two = (*DUAL_STACK, ipaddress.ip_address("fd01::2"))
    plan = compile_kernel_denies([deny("[[[{destinationIps: ['fd00::/16']}]]]")], workload_ips=two)
    assert plan.rules == ()
    assert "some of the workload's IPv6 addresses only" in plan.left_to_userspace["ns1/d"][0]


def test_destination_ips_without_workload_addresses_stay_in_userspace() -> None:
    plan = compile_kernel_denies([deny("[[[{destinationIps: [10.0.0.0/8]}]]]")], workload_ips=())
    assert plan.rules == ()
    assert "has none" in plan.left_to_userspace["ns1/d"][0]


def test_a_policy_compiles_rule_by_rule() -> None:
    plan = compile_kernel_denies(
        [deny("[[[{namespaces: [ns9]}]], [[{destinationPorts: [22]}]]]")], workload_ips=WORKLOAD_IPS
    )
    assert plan.rules == (KernelDenyRule(None, 22),)
    assert plan.complete == frozenset()
    assert plan.left_to_userspace["ns1/d"] == ("rule 0: matches on identity (namespaces)",)


def test_an_identity_match_in_one_clause_keeps_the_whole_rule_in_userspace() -> None:
    # Compiling only the port clause would deny port 22 for everyone: broader than the rule.
    plan = compile_kernel_denies(
        [deny("[[[{destinationPorts: [22]}], [{namespaces: [{Exact: ''}]}]]]")],
        workload_ips=WORKLOAD_IPS,
    )
    assert plan.rules == ()


def test_allow_and_dry_run_policies_are_not_kernel_material() -> None:
    plan = compile_kernel_denies(
        [deny("[[]]", name="allow", action="Allow"), deny("[[]]", name="dry", dry_run=True)],
        workload_ips=WORKLOAD_IPS,
    )
    assert plan.rules == ()
    assert plan.complete == frozenset()
    assert not plan.left_to_userspace


def test_oversized_expansion_stays_in_userspace() -> None:
    ports = list(range(1, 40))
    sources = [f"10.{i}.0.0/16" for i in range(1, 40)]
    plan = compile_kernel_denies(
        [deny(f"[[[{{sourceIps: [{', '.join(sources)}], destinationPorts: {ports}}}]]]")],
        workload_ips=WORKLOAD_IPS,
    )
    assert len(ports) * len(sources) > MAX_RULES_PER_POLICY_RULE
    assert plan.rules == ()
    assert "more than" in plan.left_to_userspace["ns1/d"][0]


def test_compile_for_uses_the_applicable_policies() -> None:
    state = ProxyState()
    state.apply(
        parse_local_config(
            """
workloads:
  - {uid: w1, name: w1, namespace: ns1, workloadIps: [10.0.0.2]}
policies:
  - {name: g, namespace: istio-system, scope: Global, action: Deny, rules: [[[{destinationPorts: [1]}]]]}
  - {name: n, namespace: ns1, action: Deny, rules: [[[{destinationPorts: [2]}]]]}
  - {name: other, namespace: ns2, action: Deny, rules: [[[{destinationPorts: [3]}]]]}
"""
        )
    )
    workload = state.workload("w1")
    assert workload is not None
    plan = compile_kernel_denies(state.policies_for(workload), workload_ips=workload.workload_ips)
    assert set(plan.rules) == {KernelDenyRule(None, 1), KernelDenyRule(None, 2)}
    assert plan.complete == {"istio-system/g", "ns1/n"}
