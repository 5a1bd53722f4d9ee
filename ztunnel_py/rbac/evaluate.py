"""L4 authorization with ztunnel's semantics (``assert_rbac``, ``Authorization::matches``).

Pure: a connection's attributes and the applicable policies in, a ``Decision`` out.

Order of evaluation (Istio's, as ztunnel implements it):

1. dry-run DENY policies are evaluated and only reported (``Decision.dry_run_matches``);
2. any matching enforced DENY denies, naming the policy;
3. dry-run ALLOW policies are evaluated and only reported;
4. no enforced ALLOW policy at all: allow;
5. any matching enforced ALLOW: allow, naming the policy;
6. otherwise deny.

Matching: a policy with no rules matches nothing; rules are OR'd, the clauses of a rule AND'd,
the matches of a clause OR'd (ztunnel's code; the istio proto comment that says "AND-ed" is not
what either istiod or ztunnel does). A rule with no clauses matches everything, and so does a
clause with no matches; an empty ``Match`` is skipped, so a clause made only of empty matches
never matches.
"""

from __future__ import annotations

import functools
import ipaddress
import logging
from collections.abc import Iterable
from dataclasses import dataclass

from ztunnel_py.identity.errors import InvalidSpiffeId
from ztunnel_py.identity.spiffe import URI_PREFIX, Identity
from ztunnel_py.ip import IPAddress
from ztunnel_py.rbac.model import Action, Authorization, Match, ServiceAccountMatch, StringMatch


# Peers repeat (and conntrack re-evaluates every live connection on each policy change), so a
# verified identity is parsed once rather than once per connection.
@functools.lru_cache(maxsize=1024)
def _parse_identity(uri: str) -> Identity | None:
    try:
        return Identity.parse(uri)
    except InvalidSpiffeId:
        return None


def canonical_ip(ip: IPAddress) -> IPAddress:
    """An IPv4-mapped IPv6 address (``::ffff:10.0.0.1``) as the IPv4 address it carries.

    A dual-stack socket reports IPv4 peers this way; policies are written with IPv4 CIDRs.
    """
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


@dataclass(frozen=True, slots=True, kw_only=True)
class ConnectionInfo:
    """The L4 attributes an inbound connection is authorized on (ztunnel ``rbac::Connection``).

    ``dst_port`` is the resolved target port on the workload (never 15008, never the service
    port). ``src_identity`` is the verified peer's SPIFFE URI, ``None`` for plaintext (15006).
    An identity that is not ``spiffe://<td>/ns/<ns>/sa/<sa>`` (certificate checks should have
    refused it) has an empty namespace, matches no service account, and is compared with
    principals without its ``spiffe://`` prefix if it has one.
    """

    src_ip: IPAddress
    src_port: int
    dst_ip: IPAddress
    dst_port: int
    src_identity: str | None = None
    dst_network: str = ""

    def __str__(self) -> str:
        return (
            f"{_addr(self.src_ip, self.src_port)}({self.src_identity or 'None'})"
            f"->{_addr(self.dst_ip, self.dst_port)}"
        )


def _addr(ip: IPAddress, port: int) -> str:
    return f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"


@dataclass(frozen=True, slots=True)
class Decision:
    """The outcome, worded for operators.

    ``policy`` is the ``namespace/name`` that decided (``None`` when a default decided).
    ``dry_run_matches`` lists the dry-run policies that matched (DENY ones always, ALLOW ones
    unless an enforced DENY decided first). ``dry_run_denied`` tells whether the connection
    would have been denied had the dry-run policies been enforced.
    """

    allowed: bool
    policy: str | None
    reason: str
    dry_run_matches: tuple[str, ...] = ()
    dry_run_denied: bool = False


class _Peer:
    """Per-connection values every match reads, computed once per evaluation."""

    __slots__ = ("dst_ip", "dst_port", "identity", "namespace", "principal", "src_ip")

    def __init__(self, conn: ConnectionInfo) -> None:
        self.src_ip = canonical_ip(conn.src_ip)
        self.dst_ip = canonical_ip(conn.dst_ip)
        self.dst_port = conn.dst_port
        # Istio writes principals without the scheme; an identity without it never matches.
        if conn.src_identity is not None and conn.src_identity.startswith(URI_PREFIX):
            self.principal: str | None = conn.src_identity[len(URI_PREFIX) :]
        else:
            self.principal = None
        self.identity = _parse_identity(conn.src_identity) if conn.src_identity else None
        # The namespace comes from the identity, never from a workload lookup.
        self.namespace = self.identity.namespace if self.identity is not None else ""


def _principal_matches(m: StringMatch, peer: _Peer) -> bool:
    return peer.principal is not None and m.matches(peer.principal)


def _service_account_matches(accounts: Iterable[ServiceAccountMatch], peer: _Peer) -> bool:
    identity = peer.identity
    return identity is not None and any(
        sa.namespace == identity.namespace and sa.service_account == identity.service_account
        for sa in accounts
    )


def _match_matches(m: Match, peer: _Peer) -> bool:
    """One ``Match``: field types AND'd; positive list any-of, ``not_`` list none-of."""
    if m.destination_ips and not any(peer.dst_ip in n for n in m.destination_ips):
        return False
    if m.not_destination_ips and any(peer.dst_ip in n for n in m.not_destination_ips):
        return False
    if m.source_ips and not any(peer.src_ip in n for n in m.source_ips):
        return False
    if m.not_source_ips and any(peer.src_ip in n for n in m.not_source_ips):
        return False
    if m.destination_ports and peer.dst_port not in m.destination_ports:
        return False
    if m.not_destination_ports and peer.dst_port in m.not_destination_ports:
        return False
    if m.service_accounts and not _service_account_matches(m.service_accounts, peer):
        return False
    if m.not_service_accounts and _service_account_matches(m.not_service_accounts, peer):
        return False
    if m.principals and not any(_principal_matches(p, peer) for p in m.principals):
        return False
    if m.not_principals and any(_principal_matches(p, peer) for p in m.not_principals):
        return False
    if m.namespaces and not any(n.matches(peer.namespace) for n in m.namespaces):
        return False
    return not (m.not_namespaces and any(n.matches(peer.namespace) for n in m.not_namespaces))


def _policy_matches(policy: Authorization, peer: _Peer) -> bool:
    for rule in policy.rules:
        # A clause without matches counts as matched, as in ztunnel's code.
        if all(
            not clause or any(not m.is_empty and _match_matches(m, peer) for m in clause)
            for clause in rule
        ):
            return True
    return False  # also the zero-rule policy: it matches nothing


def policy_matches(policy: Authorization, conn: ConnectionInfo) -> bool:
    """Whether ``policy``'s rules match ``conn`` (regardless of its action or dry-run flag)."""
    return _policy_matches(policy, _Peer(conn))


def evaluate(conn: ConnectionInfo, policies: Iterable[Authorization]) -> Decision:
    """Authorize an inbound connection against the applicable policies, as ztunnel does."""
    allow: list[Authorization] = []
    deny: list[Authorization] = []
    allow_dry: list[Authorization] = []
    deny_dry: list[Authorization] = []
    for p in policies:
        if p.action is Action.ALLOW:
            (allow_dry if p.dry_run else allow).append(p)
        else:
            (deny_dry if p.dry_run else deny).append(p)
    peer = _Peer(conn)

    dry_matches = [p.key for p in deny_dry if _policy_matches(p, peer)]
    dry_denied = bool(dry_matches)
    for p in deny:
        if _policy_matches(p, peer):
            return Decision(False, p.key, f"denied by policy {p.key}", tuple(dry_matches), True)

    dry_allow_matched = False
    for p in allow_dry:
        if _policy_matches(p, peer):
            dry_matches.append(p.key)
            dry_allow_matched = True
    dry = tuple(dry_matches)

    if not allow:
        # Enforcing the dry-run ALLOWs would deny when none of them matched.
        dry_denied = dry_denied or (bool(allow_dry) and not dry_allow_matched)
        reason = "allowed: no ALLOW policies apply"
        if allow_dry and not dry_allow_matched:
            reason += " (dry-run: no ALLOW policy matched)"
        return Decision(True, None, reason, dry, dry_denied)
    for p in allow:
        if _policy_matches(p, peer):
            return Decision(True, p.key, f"allowed by policy {p.key}", dry, dry_denied)
    return Decision(
        False, None, "denied: no ALLOW policy matched", dry, dry_denied or not dry_allow_matched
    )


def log_decision(
    logger: logging.Logger,
    decision: Decision,
    conn: ConnectionInfo,
    info_level: bool,
) -> None:
    """ztunnel's ``authpol_log``: INFO with ``AUTHZ_POLICY_INFO_LOGGING=true``, DEBUG otherwise."""
    level = logging.INFO if info_level else logging.DEBUG
    if not logger.isEnabledFor(level):
        return
    conn_text = str(conn)
    for key in decision.dry_run_matches:
        logger.log(
            level,
            "dry-run: policy match",
            extra={"fields": {"policy": key, "conn": conn_text}},
        )
    fields: dict[str, object] = {"conn": conn_text}
    if decision.policy is not None:
        fields["policy"] = decision.policy
    fields["allowed"] = decision.allowed
    if decision.dry_run_matches or decision.dry_run_denied:
        fields["dry_run_denied"] = decision.dry_run_denied
    logger.log(level, decision.reason, extra={"fields": fields})
