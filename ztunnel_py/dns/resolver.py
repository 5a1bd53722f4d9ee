"""What the DNS proxy answers from the mesh state itself (pure: no I/O).

ztunnel's rules (``src/dns/server.rs``), for A and AAAA queries only:

- the name is tried as asked, then as the Kubernetes names it can stand for from the client's
  namespace (``svc`` -> ``svc.<ns>.svc.<domain>``, ``svc.ns`` -> ``svc.ns.svc.<domain>``, ...),
  then with each of the client's search domains stripped (what a stub resolver appended) and
  again expanded; each candidate is also tried as the wildcards that cover it (``*.b.c``,
  ``*.c``), so ServiceEntry hosts like ``*.example.com`` match;
- a service counts if it has VIPs or is a headless Kubernetes service (hostname under
  ``svc.<domain>``); services with ``visibility: Namespace`` only for clients in their
  namespace; among services sharing the hostname, the client's namespace wins, then a
  canonical one, then the first;
- a service answers with its VIPs on the client's network, a headless one with one address of
  each endpoint workload; ``ip_families`` and ``IPV6_ENABLED`` decide which record types it
  has: a type it lacks is an empty authoritative answer, not NXDOMAIN;
- a match found only after stripping a search domain answers with a CNAME from the asked name
  to the stripped one (unless a wildcard matched), then the addresses under that name;
- anything else (other names, other record types) is not ours: ``resolve`` returns ``None``
  and the caller forwards the query upstream.

Names are handled as tuples of labels, compared in lower case; answers keep the client's
spelling.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from ztunnel_py.state.model import IPAddress, IpFamily, Service, Visibility, Workload
from ztunnel_py.state.store import ProxyState

TTL_SECONDS = 30  # ztunnel's TTL for every record it answers itself

Labels = tuple[str, ...]  # a name without its root label: ("web", "default", "svc", ...)

# Access-log ``result`` values, as ztunnel writes them.
RESULT_SUCCESS = "success"
RESULT_NO_RECORDS = "no records"
RESULT_WRONG_FAMILY = "service does not support this record type"


class RecordType:
    """The three record types the mesh answers with (their DNS type codes)."""

    A = 1
    CNAME = 5
    AAAA = 28


@dataclass(frozen=True, slots=True)
class MeshRecord:
    name: Labels
    rdtype: int  # RecordType.A, AAAA or CNAME
    value: str  # an address, or the CNAME target as dotted labels


@dataclass(frozen=True, slots=True)
class MeshAnswer:
    """An authoritative answer; ``records`` may be empty (the name exists, not this type)."""

    records: tuple[MeshRecord, ...]
    result: str
    service: str = ""  # the matched service's namespace/hostname

    @property
    def addresses(self) -> int:
        return sum(1 for r in self.records if r.rdtype != RecordType.CNAME)


@dataclass(frozen=True, slots=True)
class _Alias:
    name: Labels  # lower case
    stripped: int | None  # length of the asked name once a search domain was stripped


def labels_of(text: str) -> Labels:
    """``"a.b.c."`` or ``"a.b.c"`` -> ``("a", "b", "c")`` (lower case)."""
    return tuple(p for p in text.lower().rstrip(".").split(".") if p)


def search_domains_for(namespace: str, cluster_domain: str) -> tuple[Labels, ...]:
    """A pod's search path in Kubernetes: ``<ns>.svc.<domain>``, ``svc.<domain>``, ``<domain>``."""
    domain = labels_of(cluster_domain)
    return ((namespace.lower(), "svc", *domain), ("svc", *domain), domain)


def _has_domain(name: Labels, domain: Labels) -> bool:
    return (
        bool(domain)
        and domain[0] != "*"
        and len(name) > len(domain)
        and name[-len(domain) :] == domain
    )


def _wildcards(name: Labels) -> list[Labels]:
    """The name, then ``*`` over each of its parents: a.b.c -> a.b.c, *.b.c, *.c."""
    out = [name]
    rest = name
    while len(rest) > 1:
        out.append(("*", *rest[1:]))
        rest = rest[1:]
    return out


class MeshResolver:
    """Answers A/AAAA queries from ``state`` for one client workload at a time.

    ``static_search_domains``: the search path of the node's resolv.conf, used in dedicated
    mode; ``None`` (shared mode) gives every client its own namespace's Kubernetes search path.
    """

    def __init__(
        self,
        state: ProxyState,
        *,
        cluster_domain: str = "cluster.local",
        ipv6_enabled: bool = True,
        static_search_domains: Sequence[str] | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.state = state
        self.cluster_domain = cluster_domain
        self.ipv6_enabled = ipv6_enabled
        self._domain = labels_of(cluster_domain)
        self._svc_domain = ("svc", *self._domain)
        self._svc_suffix = "." + ".".join(self._svc_domain)
        self._static_search = (
            None
            if static_search_domains is None
            else tuple(labels_of(d) for d in static_search_domains if labels_of(d))
        )
        self._rng = rng or random.Random()

    def search_domains(self, client: Workload) -> tuple[Labels, ...]:
        if self._static_search is not None:
            return self._static_search
        return search_domains_for(client.namespace, self.cluster_domain)

    def resolve(self, client: Workload, qname: Labels, rdtype: int) -> MeshAnswer | None:
        """The mesh's answer for ``qname`` (the client's spelling), or ``None``: forward it."""
        if rdtype not in (RecordType.A, RecordType.AAAA):
            return None
        asked = tuple(label.lower() for label in qname)
        found = self._find_service(client, asked)
        if found is None:
            return None
        service, alias, via_wildcard = found
        if not self._family_allowed(service, rdtype):
            return MeshAnswer((), RESULT_WRONG_FAMILY, service.key)
        addresses = self._addresses(client, service, rdtype)
        if not addresses:
            return MeshAnswer((), RESULT_NO_RECORDS, service.key)
        records: list[MeshRecord] = []
        owner = qname
        if alias.stripped is not None and not via_wildcard:
            owner = qname[: alias.stripped]
            records.append(MeshRecord(qname, RecordType.CNAME, ".".join(owner)))
        records += (MeshRecord(owner, rdtype, str(ip)) for ip in addresses)
        return MeshAnswer(tuple(records), RESULT_SUCCESS, service.key)

    # ------------------------------------------------------------------ matching

    def _aliases(self, client: Workload, name: Labels) -> list[_Alias]:
        out: list[_Alias] = []
        seen: set[Labels] = set()

        def add(alias_name: Labels, stripped: int | None) -> None:
            if alias_name not in seen:
                seen.add(alias_name)
                out.append(_Alias(alias_name, stripped))

        namespaced = (client.namespace.lower(), *self._svc_domain)
        add(name, None)
        for fqdn in self._kube_fqdns(name, namespaced):
            add(fqdn, None)
        for search in self.search_domains(client):
            if not _has_domain(name, search):
                continue
            stripped = name[: len(name) - len(search)]
            add(stripped, len(stripped))
            for fqdn in self._kube_fqdns(stripped, namespaced):
                add(fqdn, len(stripped))
        return out

    def _kube_fqdns(self, name: Labels, namespaced: Labels) -> list[Labels]:
        """What a short name can mean in Kubernetes, seen from the client's namespace."""
        n = len(name)
        if n == 1:
            return [name + namespaced]
        if n == 2:
            return [name + self._svc_domain, name + namespaced]
        if n == 3:
            out = [name + self._domain] if name[-1] == "svc" else []
            return [*out, name + self._svc_domain]
        if n == 4 and name[-1] == "svc":
            return [name + self._domain]
        return []

    def _find_service(self, client: Workload, name: Labels) -> tuple[Service, _Alias, bool] | None:
        for alias in self._aliases(client, name):
            for candidate in _wildcards(alias.name):
                services = [
                    s
                    for s in self.state.services_by_hostname(".".join(candidate))
                    if (s.vips or s.hostname.endswith(self._svc_suffix))
                    and (
                        s.visibility is not Visibility.NAMESPACE or s.namespace == client.namespace
                    )
                ]
                best = _best_match(services, client.namespace)
                if best is not None:
                    return best, alias, candidate[0] == "*"
        return None

    # ------------------------------------------------------------------ addresses

    def _family_allowed(self, service: Service, rdtype: int) -> bool:
        if rdtype == RecordType.AAAA and not self.ipv6_enabled:
            return False
        if service.ip_families is IpFamily.IPV4:
            return rdtype == RecordType.A
        if service.ip_families is IpFamily.IPV6:
            return rdtype == RecordType.AAAA
        return True

    def _wanted(self, ip: IPAddress, rdtype: int) -> bool:
        if ip.version == 4:
            return rdtype == RecordType.A
        return rdtype == RecordType.AAAA and self.ipv6_enabled

    def _addresses(self, client: Workload, service: Service, rdtype: int) -> list[IPAddress]:
        if service.vips:
            out = [
                vip.address
                for vip in service.vips
                if vip.network == client.network and self._wanted(vip.address, rdtype)
            ]
        else:  # headless: one address of each endpoint workload
            out = []
            for uid in self.state.endpoints(service.key):
                workload = self.state.workload(uid)
                if workload is None:
                    continue
                ip = next((a for a in workload.workload_ips if self._wanted(a, rdtype)), None)
                if ip is not None:
                    out.append(ip)
        self._rng.shuffle(out)
        return out


def _best_match(services: Sequence[Service], client_namespace: str) -> Service | None:
    """ztunnel's ``ServiceMatch``: the client's namespace, else the last canonical, else first."""
    canonical: Service | None = None
    for service in services:
        if service.namespace == client_namespace:
            return service
        if service.canonical:
            canonical = service
    if canonical is not None:
        return canonical
    return services[0] if services else None
