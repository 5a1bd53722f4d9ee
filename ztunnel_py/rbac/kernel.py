"""The part of a workload's DENY policies that the kernel may enforce on plaintext inbound.

Inbound plaintext (no mTLS, so no peer identity) is steered by ``sk_lookup`` to the pod's 15006
listener, where ``evaluate`` decides. A DENY that depends only on the source address and the
destination port can instead be enforced there with ``SK_DROP``, before any userspace hop. This
module computes that subset, as a union of ``KernelDenyRule``s: a connection is dropped when
some rule's ``src`` contains its (canonical) source IP and its ``dst_port`` equals the
connection's destination port (``None`` is "any" for both).

Soundness: the kernel only ever drops a connection that ``evaluate`` denies too, because an
enforced DENY that matches decides before any ALLOW is looked at. Anything not compiled stays
with userspace, which still evaluates every policy, so leaving a rule out never lets a
connection through that ztunnel would refuse; compiling a rule inexactly could, so nothing is
ever approximated.

What compiles, per rule of an enforced (not dry-run) DENY policy (a rule compiles exactly or
not at all; a policy may compile in part, rule by rule):

- a rule with no clauses, or a clause with no matches: "everything" (``src=None, dst_port=None``);
- an empty ``Match``: nothing (ztunnel skips it);
- ``source_ips``: one rule per CIDR; ``not_source_ips``: the exact complement of the listed
  CIDRs in both address families, as CIDRs (at most 32 per IPv4 and 128 per IPv6 entry);
- ``destination_ports``: one rule per port;
- ``destination_ips`` / ``not_destination_ips``: folded, per address family, to true or false
  against the workload's own addresses of that family (the plan is per workload and the kernel
  applies it to connections addressed to them; a connection's source, which the kernel sees, is
  of its destination's family), when they give the same answer for every such address: a DENY
  on the workload's IPv6 addresses becomes a rule on every IPv6 source;
- AND (fields of a match, clauses of a rule) is the pairwise intersection of rule sets, OR
  (matches of a clause, rules of a policy, policies) is their union.

What does not compile, and why:

- any identity field (``principals``, ``namespaces``, ``service_accounts`` and their ``not_``
  variants): the kernel has no peer identity. For plaintext they are constants, but the kernel
  plan is limited by design to address and port matches, so these stay in userspace;
- ``not_destination_ports``: the IR has no port ranges or negation, and the complement of a port
  set is up to 65535 entries;
- ``destination_ips`` that match some of the workload's addresses of one family but not others,
  or a workload without addresses: the IR has no destination address;
- a rule whose expansion exceeds ``MAX_RULES_PER_POLICY_RULE`` entries (cross products of
  large lists): exact but too large for a map, so it stays in userspace;
- ALLOW policies (an ALLOW set denies what none of them match, which needs all of them) and
  dry-run DENY policies (never enforced).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import NamedTuple

from ztunnel_py.ip import IPAddress, IPNetwork
from ztunnel_py.rbac.evaluate import canonical_ip
from ztunnel_py.rbac.model import Action, Authorization, Match, Rule

MAX_RULES_PER_POLICY_RULE = 1024


@dataclass(frozen=True, slots=True)
class KernelDenyRule:
    """Drop when ``src`` contains the source IP and ``dst_port`` is the port; ``None`` is any.

    Source addresses are compared in canonical form: an IPv4-mapped IPv6 peer is its IPv4
    address, as ``evaluate`` sees it.
    """

    src: IPNetwork | None
    dst_port: int | None

    def matches(self, src_ip: IPAddress, dst_port: int) -> bool:
        if self.dst_port is not None and self.dst_port != dst_port:
            return False
        return self.src is None or canonical_ip(src_ip) in self.src


@dataclass(frozen=True, slots=True)
class KernelDenyPlan:
    """The kernel's share of one workload's DENY policies.

    ``complete`` names the enforced DENY policies compiled in full (the kernel decides them
    alone for plaintext); ``left_to_userspace`` maps every other enforced DENY policy with at
    least one rule that did not compile to the reasons, one per such rule.
    """

    rules: tuple[KernelDenyRule, ...]
    complete: frozenset[str]
    left_to_userspace: Mapping[str, tuple[str, ...]]

    def denies(self, src_ip: IPAddress, dst_port: int) -> bool:
        return any(r.matches(src_ip, dst_port) for r in self.rules)


class _NotCompilable(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# Internally a CIDR is (address bits, network as int, prefix length): the set algebra below
# runs on plain ints, which is what keeps large complements cheap.
class _Net(NamedTuple):
    bits: int
    value: int
    prefix: int


_Rect = tuple[_Net | None, int | None]  # (source, port); None is "any"

_ANY: _Rect = (None, None)
_UNIVERSES = (_Net(32, 0, 0), _Net(128, 0, 0))
_IDENTITY_FIELDS = (
    "principals",
    "not_principals",
    "namespaces",
    "not_namespaces",
    "service_accounts",
    "not_service_accounts",
)


def _net(n: IPNetwork) -> _Net:
    return _Net(n.max_prefixlen, int(n.network_address), n.prefixlen)


def _to_network(n: _Net) -> IPNetwork:
    if n.bits == 32:
        return ipaddress.IPv4Network((n.value, n.prefix))
    return ipaddress.IPv6Network((n.value, n.prefix))


def _contains(outer: _Net, inner: _Net) -> bool:
    if outer.bits != inner.bits or outer.prefix > inner.prefix:
        return False
    shift = outer.bits - outer.prefix
    return (inner.value >> shift) == (outer.value >> shift)


def _truncate(n: _Net, prefix: int) -> _Net:
    shift = n.bits - prefix
    return _Net(n.bits, (n.value >> shift) << shift, prefix)


def _intersect_one(a: _Rect, b: _Rect) -> _Rect | None:
    a_src, a_port = a
    b_src, b_port = b
    if a_port is None:
        port = b_port
    elif b_port is None or b_port == a_port:
        port = a_port
    else:
        return None
    if a_src is None:
        src = b_src
    elif b_src is None or _contains(b_src, a_src):
        src = a_src
    elif _contains(a_src, b_src):
        src = b_src
    else:
        return None  # two CIDRs are nested or disjoint
    return (src, port)


def _intersect(a: Sequence[_Rect], b: Sequence[_Rect]) -> list[_Rect]:
    out: list[_Rect] = []
    for x in a:
        for y in b:
            both = _intersect_one(x, y)
            if both is not None:
                out.append(both)
                if len(out) > MAX_RULES_PER_POLICY_RULE:
                    raise _NotCompilable(
                        f"expands to more than {MAX_RULES_PER_POLICY_RULE} kernel entries"
                    )
    return _simplify(out)


def _simplify(rects: Iterable[_Rect]) -> list[_Rect]:
    """Drop duplicates and entries that another entry covers; keeps first-seen order.

    A covering entry has the same or no port and a supernet (or no) source, so each entry is
    looked up against the prefix lengths present instead of compared with every other entry.
    """
    present = dict.fromkeys(rects)
    prefixes: dict[int, set[int]] = {}
    for src, _ in present:
        if src is not None:
            prefixes.setdefault(src.bits, set()).add(src.prefix)
    return [r for r in present if not _covered_by_another(r, present, prefixes)]


def _covered_by_another(
    rect: _Rect, present: Mapping[_Rect, None], prefixes: Mapping[int, set[int]]
) -> bool:
    src, port = rect
    ports = (None,) if port is None else (port, None)
    for p in ports:
        if (None, p) != rect and (None, p) in present:
            return True
        if src is None:
            continue
        for length in prefixes.get(src.bits, ()):
            if length <= src.prefix:
                candidate = (_truncate(src, length), p)
                if candidate != rect and candidate in present:
                    return True
    return False


def _exclude(piece: _Net, hole: _Net) -> list[_Net]:
    """``piece`` minus ``hole`` (which it contains), as CIDRs: one per bit of the difference."""
    out = []
    current = piece
    while current.prefix < hole.prefix:
        prefix = current.prefix + 1
        low = _Net(current.bits, current.value, prefix)
        high = _Net(current.bits, current.value | (1 << (current.bits - prefix)), prefix)
        current, other = (low, high) if _contains(low, hole) else (high, low)
        out.append(other)
    return out


def _complement(excluded: Iterable[IPNetwork]) -> list[_Net]:
    """Every address in either family outside ``excluded``, as CIDRs."""
    pieces = list(_UNIVERSES)
    for net in map(_net, excluded):
        next_pieces: list[_Net] = []
        for piece in pieces:
            if _contains(net, piece):
                continue
            if _contains(piece, net):
                next_pieces.extend(_exclude(piece, net))
            else:
                next_pieces.append(piece)
        pieces = next_pieces
    return pieces


def _destination_families(m: Match, workload_ips: Sequence[IPAddress]) -> list[_Net]:
    """The address families (as source universes) of the connections to the workload that the
    destination fields hold for. A TCP connection's two ends are of one family, so the family
    of the source the kernel looks up is the destination's; within a family the fields must
    give one answer for all of the workload's addresses. A family the workload has no address
    of is left out: denying nothing in the kernel is always sound."""
    if not workload_ips:
        raise _NotCompilable("destination_ips need the workload's addresses, and it has none")

    def holds(ip: IPAddress) -> bool:
        if m.destination_ips and not any(ip in n for n in m.destination_ips):
            return False
        return not (m.not_destination_ips and any(ip in n for n in m.not_destination_ips))

    own = [canonical_ip(ip) for ip in workload_ips]
    held = []
    for universe in _UNIVERSES:
        answers = {holds(ip) for ip in own if ip.max_prefixlen == universe.bits}
        if len(answers) > 1:
            family = 4 if universe.bits == 32 else 6
            raise _NotCompilable(
                f"destination_ips match some of the workload's IPv{family} addresses only"
            )
        if answers == {True}:
            held.append(universe)
    return held


def _compile_match(m: Match, workload_ips: Sequence[IPAddress]) -> list[_Rect]:
    if m.is_empty:
        return []
    identity = [f for f in _IDENTITY_FIELDS if getattr(m, f)]
    if identity:
        raise _NotCompilable(f"matches on identity ({', '.join(identity)})")
    if m.not_destination_ports:
        raise _NotCompilable("not_destination_ports has no kernel form")
    region: list[_Rect] = [_ANY]
    if m.destination_ips or m.not_destination_ips:
        families = _destination_families(m, workload_ips)
        if not families:
            return []
        if len(families) < len(_UNIVERSES):
            region = [(universe, None) for universe in families]
    if m.source_ips:
        sources = _simplify((_net(n), None) for n in m.source_ips)
        region = sources if region == [_ANY] else _intersect(region, sources)
    if m.not_source_ips:
        region = _intersect(region, [(n, None) for n in _complement(m.not_source_ips)])
    if m.destination_ports:
        region = _intersect(region, [(None, p) for p in m.destination_ports])
    return region


def _compile_rule(rule: Rule, workload_ips: Sequence[IPAddress]) -> list[_Rect]:
    region: list[_Rect] = [_ANY]  # no clauses: matches everything
    for clause in rule:
        if not clause:
            continue  # a clause without matches counts as matched
        either: list[_Rect] = []
        for m in clause:
            either.extend(_compile_match(m, workload_ips))
        region = _intersect(region, _simplify(either))
        if not region:
            break
    return region


def compile_kernel_denies(
    policies: Iterable[Authorization], *, workload_ips: Sequence[IPAddress]
) -> KernelDenyPlan:
    """The plaintext DENY rules the kernel may enforce for a workload with ``workload_ips``."""
    rects: list[_Rect] = []
    complete: set[str] = set()
    left: dict[str, tuple[str, ...]] = {}
    for policy in policies:
        if policy.action is not Action.DENY or policy.dry_run:
            continue
        reasons: list[str] = []
        for index, rule in enumerate(policy.rules):
            try:
                rects.extend(_compile_rule(rule, workload_ips))
            except _NotCompilable as e:
                reasons.append(f"rule {index}: {e.reason}")
        if reasons:
            left[policy.key] = tuple(reasons)
        else:
            complete.add(policy.key)
    rules = tuple(
        KernelDenyRule(None if src is None else _to_network(src), port)
        for src, port in _simplify(rects)
    )
    return KernelDenyPlan(
        rules=rules, complete=frozenset(complete), left_to_userspace=MappingProxyType(left)
    )
