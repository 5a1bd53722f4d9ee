"""L4 authorization policies as ztunnel holds them (``src/rbac.rs``). Pure, immutable data.

A policy's ``rules`` is three levels deep: rules are OR'd, the clauses of a rule are AND'd, and
the matches of a clause are OR'd (ztunnel's code, not the istio proto comment). Within a
``Match`` the different fields are AND'd; within one field the positive list means "any of" and
the ``not_`` list means "none of".
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from ztunnel_py.ip import IPNetwork


class Scope(enum.Enum):
    GLOBAL = "Global"
    NAMESPACE = "Namespace"
    WORKLOAD_SELECTOR = "WorkloadSelector"


class Action(enum.Enum):
    ALLOW = "Allow"
    DENY = "Deny"


class StringMatchKind(enum.Enum):
    EXACT = "Exact"
    PREFIX = "Prefix"
    SUFFIX = "Suffix"
    PRESENCE = "Presence"


@dataclass(frozen=True, slots=True)
class StringMatch:
    kind: StringMatchKind
    value: str = ""

    def matches(self, candidate: str) -> bool:
        if self.kind is StringMatchKind.EXACT:
            return candidate == self.value
        if self.kind is StringMatchKind.PREFIX:
            return candidate.startswith(self.value)
        if self.kind is StringMatchKind.SUFFIX:
            return candidate.endswith(self.value)
        return candidate != ""  # presence: any non-empty value


@dataclass(frozen=True, slots=True)
class ServiceAccountMatch:
    namespace: str
    service_account: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Match:
    namespaces: tuple[StringMatch, ...] = ()
    not_namespaces: tuple[StringMatch, ...] = ()
    service_accounts: tuple[ServiceAccountMatch, ...] = ()
    not_service_accounts: tuple[ServiceAccountMatch, ...] = ()
    principals: tuple[StringMatch, ...] = ()
    not_principals: tuple[StringMatch, ...] = ()
    source_ips: tuple[IPNetwork, ...] = ()
    not_source_ips: tuple[IPNetwork, ...] = ()
    destination_ips: tuple[IPNetwork, ...] = ()
    not_destination_ips: tuple[IPNetwork, ...] = ()
    destination_ports: tuple[int, ...] = ()
    not_destination_ports: tuple[int, ...] = ()

    @property
    def is_empty(self) -> bool:
        """An empty match is skipped by ztunnel: it never matches (it is not match-all)."""
        return not any(getattr(self, name) for name in self.__slots__)


class MatchList(enum.Enum):
    """What the entries of one of a ``Match``'s lists are."""

    STRING = "string"
    SERVICE_ACCOUNT = "serviceAccount"
    IP = "ip"
    PORT = "port"


#: Every list of a ``Match``: (attribute, camelCase key of ztunnel's local config and
#: ``/config_dump``, kind of its entries), in ztunnel's order.
MATCH_LISTS: tuple[tuple[str, str, MatchList], ...] = (
    ("namespaces", "namespaces", MatchList.STRING),
    ("not_namespaces", "notNamespaces", MatchList.STRING),
    ("service_accounts", "serviceAccounts", MatchList.SERVICE_ACCOUNT),
    ("not_service_accounts", "notServiceAccounts", MatchList.SERVICE_ACCOUNT),
    ("principals", "principals", MatchList.STRING),
    ("not_principals", "notPrincipals", MatchList.STRING),
    ("source_ips", "sourceIps", MatchList.IP),
    ("not_source_ips", "notSourceIps", MatchList.IP),
    ("destination_ips", "destinationIps", MatchList.IP),
    ("not_destination_ips", "notDestinationIps", MatchList.IP),
    ("destination_ports", "destinationPorts", MatchList.PORT),
    ("not_destination_ports", "notDestinationPorts", MatchList.PORT),
)


Clause = tuple[Match, ...]
Rule = tuple[Clause, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class Authorization:
    """One ``istio.security.Authorization``, keyed by ``namespace/name``."""

    name: str
    namespace: str
    scope: Scope = Scope.NAMESPACE
    action: Action = Action.ALLOW
    rules: tuple[Rule, ...] = ()
    dry_run: bool = False

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"
