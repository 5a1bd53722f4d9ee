"""Table of ztunnel authorization behaviours; each case's id names the behaviour it pins.

Policies are written in ztunnel's local-config YAML and parsed by ``parse_local_config``, so the
YAML path into the model is exercised by every case.
"""

# ruff: noqa: E501  (tables: one case per line reads better than wrapped YAML)

from __future__ import annotations

import ipaddress

import pytest

from ztunnel_py.rbac.evaluate import ConnectionInfo, evaluate
from ztunnel_py.rbac.model import Authorization
from ztunnel_py.state.store import ProxyState
from ztunnel_py.xds.local import parse_local_config

ID_A = "spiffe://cluster.local/ns/ns1/sa/sa1"
ID_B = "spiffe://cluster.local/ns/ns2/sa/sa2"
ID_OTHER_TD = "spiffe://other.example/ns/ns1/sa/sa1"


def conn(
    *,
    src: str = "10.0.0.1",
    src_port: int = 40000,
    dst: str = "10.0.0.2",
    port: int = 8080,
    identity: str | None = None,
) -> ConnectionInfo:
    return ConnectionInfo(
        src_ip=ipaddress.ip_address(src),
        src_port=src_port,
        dst_ip=ipaddress.ip_address(dst),
        dst_port=port,
        src_identity=identity,
    )


def pol(
    action: str,
    rules: str = "[]",
    *,
    name: str = "p",
    ns: str = "ns1",
    scope: str = "Namespace",
    dry_run: bool = False,
) -> str:
    """One policy as a flow-style YAML list entry (``rules`` is YAML too)."""
    return (
        f"- {{name: {name}, namespace: {ns}, scope: {scope}, action: {action},"
        f" dryRun: {str(dry_run).lower()}, rules: {rules}}}"
    )


def policies(*entries: str) -> tuple[Authorization, ...]:
    if not entries:
        return ()
    doc = "policies:\n" + "\n".join("  " + e for e in entries) + "\n"
    return parse_local_config(doc).policies


def state_from_yaml(doc: str) -> ProxyState:
    state = ProxyState()
    state.apply(parse_local_config(doc))
    return state


PLAIN = conn()  # 10.0.0.1:40000 -> 10.0.0.2:8080, no identity
MTLS_A = conn(identity=ID_A)  # spiffe://cluster.local/ns/ns1/sa/sa1
MTLS_B = conn(identity=ID_B)  # spiffe://cluster.local/ns/ns2/sa/sa2

ALLOW_ALL = pol("Allow", "[[]]", name="allow-all")
P_OK = "ns1/p"

# (policy YAML entries, connection, allowed, deciding policy or None)
CASES = [
    # --- the decision algorithm (reference 5.2) ---
    pytest.param([], PLAIN, True, None, id="no policies: allow"),
    pytest.param([pol("Allow")], PLAIN, False, None, id="zero-rule ALLOW denies (deny-all)"),
    pytest.param([pol("Deny")], PLAIN, True, None, id="zero-rule DENY matches nothing"),
    pytest.param([pol("Allow", "[[]]")], PLAIN, True, P_OK, id="rule without clauses matches all (ALLOW)"),
    pytest.param([pol("Deny", "[[]]")], MTLS_A, False, P_OK, id="rule without clauses matches all (DENY)"),
    pytest.param([pol("Deny", "[[[]]]")], PLAIN, False, P_OK, id="clause without matches counts as matched (ztunnel code)"),
    pytest.param([pol("Deny", "[[[{}]]]")], PLAIN, True, None, id="empty Match never matches (DENY is a no-op)"),
    pytest.param([pol("Allow", "[[[{}]]]")], PLAIN, False, None, id="empty Match never matches (ALLOW denies)"),
    pytest.param(
        [pol("Allow", "[[[{}, {destinationPorts: [8080]}]]]")], PLAIN, True, P_OK,
        id="empty Match is skipped, a sibling match still decides",
    ),
    pytest.param(
        [ALLOW_ALL, pol("Deny", "[[[{destinationPorts: [8080]}]]]", name="deny")], PLAIN, False, "ns1/deny",
        id="DENY wins over ALLOW",
    ),
    pytest.param(
        [pol("Deny", "[[[{destinationPorts: [8080]}]]]", name="deny"), ALLOW_ALL], PLAIN, False, "ns1/deny",
        id="DENY wins over ALLOW whatever the order",
    ),
    pytest.param(
        [pol("Deny", "[[[{destinationPorts: [9]}]]]")], PLAIN, True, None,
        id="non-matching DENY and no ALLOW: allow",
    ),
    pytest.param(
        [pol("Allow", "[[[{destinationPorts: [9]}]]]")], PLAIN, False, None,
        id="ALLOW policies exist but none matches: deny",
    ),
    pytest.param(
        [pol("Allow", "[[[{destinationPorts: [9]}]]]", name="a"), pol("Allow", "[[[{destinationPorts: [8080]}]]]", name="b")],
        PLAIN, True, "ns1/b", id="any matching ALLOW allows",
    ),
    pytest.param(
        [pol("Deny", "[[[{destinationPorts: [9]}]], [[{destinationPorts: [8080]}]]]")], PLAIN, False, P_OK,
        id="rules are OR'd (second rule matches)",
    ),
    pytest.param(
        [pol("Allow", "[[[{sourceIps: [10.0.0.0/8]}], [{destinationPorts: [8080]}]]]")], PLAIN, True, P_OK,
        id="clauses are AND'd (both hold)",
    ),
    pytest.param(
        [pol("Allow", "[[[{sourceIps: [10.0.0.0/8]}], [{destinationPorts: [9]}]]]")], PLAIN, False, None,
        id="clauses are AND'd (one fails)",
    ),
    pytest.param(
        [pol("Allow", "[[[{destinationPorts: [9]}, {sourceIps: [10.0.0.1]}]]]")], PLAIN, True, P_OK,
        id="matches in a clause are OR'd (not AND as the proto comment says)",
    ),
    pytest.param(
        [pol("Allow", "[[[{sourceIps: [10.0.0.0/8], destinationPorts: [9]}]]]")], PLAIN, False, None,
        id="field types within a Match are AND'd",
    ),
    pytest.param(
        [pol("Allow", "[[[{destinationPorts: [1, 2, 8080]}]]]")], PLAIN, True, P_OK,
        id="positive list is any-of",
    ),
    pytest.param(
        [pol("Allow", "[[[{notDestinationPorts: [8080]}]]]")], PLAIN, False, None,
        id="not_ports none-of (listed port excluded)",
    ),
    pytest.param(
        [pol("Allow", "[[[{notDestinationPorts: [9, 9999]}]]]")], PLAIN, True, P_OK,
        id="not_ports none-of (other port passes)",
    ),
    pytest.param(
        [pol("Allow", "[[[{destinationPorts: [8080], notDestinationPorts: [8080]}]]]")], PLAIN, False, None,
        id="positive and not_ list of one field both apply",
    ),
    pytest.param(
        [pol("Allow", "[[[{destinationPorts: [80]}]]]")], PLAIN, False, None,
        id="ports compare with the resolved target port, not the service port",
    ),
    pytest.param(
        [pol("Deny", "[[[{destinationPorts: [9]}]], [[{destinationPorts: [8080]}]]]", name="d"),
         pol("Deny", "[[[{destinationPorts: [8080]}]]]", name="e")],
        PLAIN, False, "ns1/d", id="first matching DENY is the one named",
    ),
    # --- addresses ---
    pytest.param([pol("Allow", "[[[{sourceIps: [10.0.0.0/24]}]]]")], PLAIN, True, P_OK, id="source_ips CIDR contains"),
    pytest.param([pol("Allow", "[[[{sourceIps: [10.1.0.0/16]}]]]")], PLAIN, False, None, id="source_ips CIDR outside"),
    pytest.param([pol("Allow", "[[[{sourceIps: [10.0.0.1]}]]]")], PLAIN, True, P_OK, id="source_ips bare address is a /32"),
    pytest.param([pol("Allow", "[[[{sourceIps: [10.0.0.3]}]]]")], PLAIN, False, None, id="source_ips /32 other address"),
    pytest.param([pol("Allow", "[[[{notSourceIps: [10.0.0.0/30]}]]]")], PLAIN, False, None, id="not_source_ips none-of excludes"),
    pytest.param([pol("Allow", "[[[{notSourceIps: [192.168.0.0/16]}]]]")], PLAIN, True, P_OK, id="not_source_ips lets others through"),
    pytest.param([pol("Allow", "[[[{destinationIps: [10.0.0.2/32]}]]]")], PLAIN, True, P_OK, id="destination_ips CIDR contains"),
    pytest.param([pol("Allow", "[[[{notDestinationIps: [10.0.0.0/24]}]]]")], PLAIN, False, None, id="not_destination_ips none-of"),
    pytest.param(
        [pol("Allow", "[[[{sourceIps: ['fd00::/64']}]]]")], conn(src="fd00::7", dst="fd00::2"), True, P_OK,
        id="IPv6 source in IPv6 CIDR",
    ),
    pytest.param(
        [pol("Allow", "[[[{sourceIps: ['::/0']}]]]")], PLAIN, False, None,
        id="IPv4 connection never matches an IPv6 CIDR",
    ),
    pytest.param(
        [pol("Allow", "[[[{sourceIps: [10.0.0.0/8]}]]]")], conn(src="::ffff:10.0.0.1"), True, P_OK,
        id="IPv4-mapped IPv6 source is compared as IPv4",
    ),
    pytest.param([pol("Allow", "[[[{sourceIps: [0.0.0.0/0]}]]]")], PLAIN, True, P_OK, id="/0 matches every address of its family"),
    pytest.param(
        [pol("Deny", "[[[{destinationIps: ['FD00:0:0::2/128']}]]]", name="d")], conn(src="fd00::7", dst="fd00::2"), False, "ns1/d",
        id="DENY on an IPv6 destination written uncompressed",
    ),
    pytest.param(
        [pol("Deny", "[[[{destinationIps: ['fd00::2/128']}]]]", name="d")], PLAIN, True, None,
        id="IPv6 destination DENY leaves the IPv4 connection alone",
    ),
    pytest.param(
        [pol("Allow", "[[[{notSourceIps: ['fd00::/112']}]]]")], conn(src="fd00::7", dst="fd00::2"), False, None,
        id="not_source_ips IPv6 excludes",
    ),
    pytest.param(
        [pol("Allow", "[[[{notSourceIps: ['fd00::/112']}]]]")], conn(src="fd00:1::7", dst="fd00::2"), True, P_OK,
        id="not_source_ips IPv6 lets other IPv6 through",
    ),
    pytest.param(
        [pol("Allow", "[[[{sourceIps: ['::ffff:10.0.0.0/104']}]]]")], conn(src="::ffff:10.0.0.1"), False, None,
        id="an IPv4-mapped CIDR is IPv6 and never matches an IPv4 peer (ztunnel's IpNet)",
    ),
    # --- principals ---
    pytest.param(
        [pol("Allow", "[[[{principals: [cluster.local/ns/ns1/sa/sa1]}]]]")], MTLS_A, True, P_OK,
        id="principal compared without spiffe://",
    ),
    pytest.param(
        [pol("Allow", "[[[{principals: ['spiffe://cluster.local/ns/ns1/sa/sa1']}]]]")], MTLS_A, False, None,
        id="principal written with spiffe:// never matches",
    ),
    pytest.param(
        [pol("Allow", "[[[{principals: [{Prefix: cluster.local/ns/ns1/}]}]]]")], MTLS_A, True, P_OK,
        id="principal prefix",
    ),
    pytest.param(
        [pol("Allow", "[[[{principals: [{Suffix: /sa/sa1}]}]]]")], MTLS_A, True, P_OK, id="principal suffix",
    ),
    pytest.param(
        [pol("Allow", "[[[{principals: [{Suffix: /sa/sa1}]}]]]")], MTLS_B, False, None, id="principal suffix mismatch",
    ),
    pytest.param(
        [pol("Allow", "[[[{principals: [{Presence: []}]}]]]")], MTLS_B, True, P_OK,
        id="principal presence matches any mTLS peer",
    ),
    pytest.param(
        [pol("Allow", "[[[{principals: [{Presence: []}]}]]]")], PLAIN, False, None,
        id="no identity never matches a principal (presence)",
    ),
    pytest.param(
        [pol("Deny", "[[[{notPrincipals: [{Presence: []}]}]]]", name="istio_converted_static_strict", ns="istio-system")],
        PLAIN, False, "istio-system/istio_converted_static_strict",
        id="STRICT mTLS (not_principals presence) denies plaintext",
    ),
    pytest.param(
        [pol("Deny", "[[[{notPrincipals: [{Presence: []}]}]]]", name="istio_converted_static_strict", ns="istio-system")],
        MTLS_A, True, None, id="STRICT mTLS (not_principals presence) lets mTLS through",
    ),
    pytest.param(
        [pol("Allow", "[[[{principals: [cluster.local/ns/ns1/sa/sa1]}]]]")], conn(identity=ID_OTHER_TD), False, None,
        id="principal includes the trust domain",
    ),
    pytest.param(
        [pol("Allow", "[[[{principals: [cluster.local/ns/ns1/sa/sa1]}]]]")], conn(identity="cluster.local/ns/ns1/sa/sa1"), False, None,
        id="identity without spiffe:// scheme never matches a principal",
    ),
    # --- namespaces ---
    pytest.param([pol("Allow", "[[[{namespaces: [ns1]}]]]")], MTLS_A, True, P_OK, id="namespace from the identity"),
    pytest.param([pol("Allow", "[[[{namespaces: [ns1]}]]]")], MTLS_B, False, None, id="namespace mismatch"),
    pytest.param(
        [pol("Allow", "[[[{namespaces: [{Exact: ''}]}]]]")], PLAIN, True, P_OK,
        id="namespace is empty for plaintext (exact '' matches)",
    ),
    pytest.param(
        [pol("Allow", "[[[{namespaces: [{Presence: []}]}]]]")], PLAIN, False, None,
        id="namespace presence never matches plaintext",
    ),
    pytest.param(
        [pol("Deny", "[[[{notNamespaces: [ns1]}]]]")], PLAIN, False, P_OK,
        id="not_namespaces: plaintext's empty namespace is none of them",
    ),
    pytest.param(
        [pol("Deny", "[[[{notNamespaces: [ns1]}]]]")], MTLS_A, True, None, id="not_namespaces excludes the listed namespace",
    ),
    pytest.param([pol("Allow", "[[[{namespaces: [{Prefix: ns}]}]]]")], MTLS_B, True, P_OK, id="namespace prefix"),
    pytest.param(
        [pol("Allow", "[[[{namespaces: [ns1]}]]]")], conn(identity=ID_OTHER_TD), True, P_OK,
        id="namespace ignores the trust domain",
    ),
    # --- service accounts ---
    pytest.param(
        [pol("Allow", "[[[{serviceAccounts: [{namespace: ns1, serviceAccount: sa1}]}]]]")], MTLS_A, True, P_OK,
        id="service_accounts exact (ns, sa)",
    ),
    pytest.param(
        [pol("Allow", "[[[{serviceAccounts: [{namespace: ns1, serviceAccount: sa1}]}]]]")], conn(identity=ID_OTHER_TD), True, P_OK,
        id="service_accounts ignore the trust domain",
    ),
    pytest.param(
        [pol("Allow", "[[[{serviceAccounts: [{namespace: ns1, serviceAccount: other}]}]]]")], MTLS_A, False, None,
        id="service_accounts other sa",
    ),
    pytest.param(
        [pol("Allow", "[[[{serviceAccounts: [{namespace: ns2, serviceAccount: sa1}]}]]]")], MTLS_A, False, None,
        id="service_accounts same sa other namespace",
    ),
    pytest.param(
        [pol("Allow", "[[[{serviceAccounts: [{namespace: '', serviceAccount: ''}]}]]]")], PLAIN, False, None,
        id="service_accounts never match plaintext",
    ),
    pytest.param(
        [pol("Deny", "[[[{notServiceAccounts: [{namespace: ns1, serviceAccount: sa1}]}]]]")], MTLS_A, True, None,
        id="not_service_accounts none-of excludes",
    ),
    pytest.param(
        [pol("Deny", "[[[{notServiceAccounts: [{namespace: ns1, serviceAccount: sa1}]}]]]")], PLAIN, False, P_OK,
        id="not_service_accounts: plaintext is none of them",
    ),
    # --- dry run ---
    pytest.param(
        [pol("Deny", "[[]]", dry_run=True)], PLAIN, True, None, id="dry-run DENY does not deny",
    ),
    pytest.param(
        [pol("Allow", "[[[{destinationPorts: [9]}]]]", dry_run=True)], PLAIN, True, None,
        id="dry-run ALLOW alone does not deny (no enforced ALLOW)",
    ),
    pytest.param(
        [pol("Allow", "[[[{destinationPorts: [9]}]]]", name="enforced"), pol("Allow", "[[]]", name="dry", dry_run=True)],
        PLAIN, False, None, id="dry-run ALLOW does not allow",
    ),
    pytest.param(
        [pol("Deny", "[[]]", name="dry", dry_run=True), pol("Deny", "[[]]", name="real")], PLAIN, False, "ns1/real",
        id="enforced DENY still denies beside a dry-run DENY",
    ),
    # --- the istiod shapes ---
    pytest.param(
        [pol("Allow", "[[[{namespaces: [ns1]}, {principals: [cluster.local/ns/ns2/sa/sa2]}], [{destinationPorts: [8080]}]]]")],
        MTLS_B, True, P_OK, id="from (namespaces | principals) and to (ports)",
    ),
    pytest.param(
        [pol("Allow", "[[[{namespaces: [ns1]}], [{destinationPorts: [8080]}]]]")], PLAIN, False, None,
        id="plaintext never satisfies a from-namespace ALLOW",
    ),
    pytest.param(
        [pol("Deny", "[[[{sourceIps: [10.0.0.0/8]}], [{destinationPorts: [9]}], [{namespaces: [{Exact: ''}]}]]]")],
        PLAIN, True, None, id="when-clause is AND'd with from and to",
    ),
    pytest.param(
        [pol("Allow", "[[[{principals: [cluster.local/ns/ns1/sa/sa1]}]]]")], conn(identity="spiffe://broken"),
        False, None, id="malformed identity: stripped string compared, never equal",
    ),
    pytest.param(
        [pol("Allow", "[[[{namespaces: [{Exact: ''}]}]]]")], conn(identity="spiffe://broken"), True, P_OK,
        id="malformed identity has an empty namespace",
    ),
]  # fmt: skip


@pytest.mark.parametrize(("entries", "connection", "allowed", "policy"), CASES)
def test_decision(
    entries: list[str], connection: ConnectionInfo, allowed: bool, policy: str | None
) -> None:
    decision = evaluate(connection, policies(*entries))
    assert (decision.allowed, decision.policy) == (allowed, policy)


# --- scopes: the applicable set through ProxyState.policies_for --------------------------------

SCOPE_DOC = """
workloads:
  - {uid: w1, name: w1, namespace: ns1, workloadIps: [10.0.0.2], authorizationPolicies: [ns1/selected, ns1/missing]}
  - {uid: w2, name: w2, namespace: ns1, workloadIps: [10.0.0.3]}
  - {uid: w3, name: w3, namespace: ns2, workloadIps: [10.0.0.4]}
policies:
  - {name: deny-9, namespace: istio-system, scope: Global, action: Deny, rules: [[[{destinationPorts: [9]}]]]}
  - {name: deny-7, namespace: ns1, scope: Namespace, action: Deny, rules: [[[{destinationPorts: [7]}]]]}
  - {name: selected, namespace: ns1, scope: WorkloadSelector, action: Allow, rules: [[[{namespaces: [ns2]}]]]}
  - {name: deny-6-ns2, namespace: ns2, scope: Namespace, action: Deny, rules: [[[{destinationPorts: [6]}]]]}
"""

SCOPE_CASES = [
    pytest.param("w1", conn(port=9), False, "istio-system/deny-9", id="global policy applies in ns1"),
    pytest.param("w3", conn(port=9), False, "istio-system/deny-9", id="global policy applies in ns2"),
    pytest.param("w2", conn(port=7), False, "ns1/deny-7", id="namespace policy applies in its namespace"),
    pytest.param("w3", conn(port=7), True, None, id="namespace policy does not apply elsewhere"),
    pytest.param("w3", conn(port=6), False, "ns2/deny-6-ns2", id="each namespace has its own"),
    pytest.param("w1", conn(identity=ID_B), True, "ns1/selected", id="selector policy applies to the listing workload"),
    pytest.param("w1", conn(identity=ID_A), False, None, id="selector ALLOW makes other peers denied"),
    pytest.param("w2", conn(identity=ID_A), True, None, id="selector policy not listed does not apply"),
    pytest.param("w1", conn(identity=ID_B, port=7), False, "ns1/deny-7", id="global + namespace + selector scopes combine"),
]  # fmt: skip


@pytest.mark.parametrize(("uid", "connection", "allowed", "policy"), SCOPE_CASES)
def test_scopes(uid: str, connection: ConnectionInfo, allowed: bool, policy: str | None) -> None:
    state = state_from_yaml(SCOPE_DOC)
    workload = state.workload(uid)
    assert workload is not None
    decision = evaluate(connection, state.policies_for(workload))
    assert (decision.allowed, decision.policy) == (allowed, policy)


def test_unknown_selector_key_is_skipped() -> None:
    # ns1/missing is listed by w1 but was never pushed: normal during a transition.
    state = state_from_yaml(SCOPE_DOC)
    workload = state.workload("w1")
    assert workload is not None
    assert [p.key for p in state.policies_for(workload)] == [
        "istio-system/deny-9",
        "ns1/deny-7",
        "ns1/selected",
    ]


# --- reasons and dry-run reporting ------------------------------------------------------------


@pytest.mark.parametrize(
    ("entries", "reason"),
    [
        pytest.param(
            [pol("Deny", "[[]]", name="d")], "denied by policy ns1/d", id="deny names the policy"
        ),
        pytest.param([], "allowed: no ALLOW policies apply", id="default allow"),
        pytest.param([pol("Allow")], "denied: no ALLOW policy matched", id="default deny"),
        pytest.param(
            [pol("Allow", "[[]]", name="a")], "allowed by policy ns1/a", id="allow names the policy"
        ),
    ],
)
def test_reasons(entries: list[str], reason: str) -> None:
    assert evaluate(PLAIN, policies(*entries)).reason == reason


def test_dry_run_deny_is_reported_not_enforced() -> None:
    decision = evaluate(PLAIN, policies(pol("Deny", "[[]]", name="dry", dry_run=True)))
    assert decision.allowed
    assert decision.dry_run_matches == ("ns1/dry",)
    assert decision.dry_run_denied


def test_dry_run_allow_match_is_reported() -> None:
    decision = evaluate(
        PLAIN,
        policies(
            pol("Allow", "[[]]", name="real"),
            pol("Allow", "[[]]", name="dry", dry_run=True),
            pol("Allow", "[[[{destinationPorts: [9]}]]]", name="dry-miss", dry_run=True),
        ),
    )
    assert (decision.allowed, decision.policy) == (True, "ns1/real")
    assert decision.dry_run_matches == ("ns1/dry",)
    assert not decision.dry_run_denied


def test_dry_run_allow_that_would_deny() -> None:
    decision = evaluate(
        PLAIN, policies(pol("Allow", "[[[{destinationPorts: [9]}]]]", name="dry", dry_run=True))
    )
    assert decision.allowed
    assert decision.dry_run_matches == ()
    assert decision.dry_run_denied
    assert "dry-run" in decision.reason


def test_enforced_deny_keeps_dry_run_deny_matches() -> None:
    decision = evaluate(
        PLAIN,
        policies(pol("Deny", "[[]]", name="dry", dry_run=True), pol("Deny", "[[]]", name="real")),
    )
    assert not decision.allowed
    assert decision.dry_run_matches == ("ns1/dry",)
