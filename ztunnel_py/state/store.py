"""``ProxyState``: the indexed mesh state, with one mutator, ``apply(batch) -> ChangeSet``.

Pure Python, no I/O, one writer (the xDS or local-config task on the event loop). Readers use
the lookup methods; later parts (BPF projection, live-connection re-evaluation, on-demand
waiters) follow the ``ChangeSet`` that every ``apply`` returns.

Semantics follow ztunnel's ``ProxyState`` (``src/state.rs``):

- workloads are indexed by uid and by ``network/ip`` (host-network workloads are not, since
  their IP is the node's);
- services by ``namespace/hostname``, by hostname and by VIP; several services may share a VIP
  (in different namespaces), and lookups prefer the client's namespace;
- an address that is no service's host VIP falls back to the services' CIDR VIPs
  (``get_best_by_cidr_vip``): the client's namespace first, then the longest prefix, then a
  canonical service; a ``Namespace``-visible service is hidden from other namespaces' clients;
- endpoints come from ``Workload.services``, so workloads and services may arrive in any order;
  endpoints whose service is not known yet are "staged";
- policies by key, by namespace (scope Namespace) and globally (scope Global); workload-selector
  policies are reached through ``Workload.authorization_policies``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from ztunnel_py.rbac.model import Authorization, Scope
from ztunnel_py.state.model import (
    Endpoint,
    IPAddress,
    NetworkAddress,
    NetworkMode,
    Service,
    Visibility,
    Workload,
    frozen_map,
)


@dataclass(frozen=True, slots=True, kw_only=True)
class UpdateBatch:
    """One push worth of changes, already converted and validated.

    ``removed_addresses`` holds xDS Address removal names, which are either a workload uid or a
    service ``namespace/hostname``. With ``replace`` the batch is the whole state (local config
    load): everything not named in it is removed.
    """

    workloads: tuple[Workload, ...] = ()
    services: tuple[Service, ...] = ()
    policies: tuple[Authorization, ...] = ()
    removed_addresses: tuple[str, ...] = ()
    removed_policies: tuple[str, ...] = ()
    replace: bool = False

    @property
    def is_empty(self) -> bool:
        """Nothing to apply (a replacing batch never is: it removes what it does not name)."""
        return not (
            self.workloads
            or self.services
            or self.policies
            or self.removed_addresses
            or self.removed_policies
            or self.replace
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class ChangeSet:
    """What one ``apply`` changed; empty sets mean "untouched"."""

    generation: int
    workloads_upserted: frozenset[str] = frozenset()
    workloads_removed: frozenset[str] = frozenset()
    services_upserted: frozenset[str] = frozenset()
    services_removed: frozenset[str] = frozenset()
    endpoints_changed: frozenset[str] = frozenset()  # service keys whose endpoint set changed
    policies_upserted: frozenset[str] = frozenset()
    policies_removed: frozenset[str] = frozenset()

    @property
    def is_empty(self) -> bool:
        return not (
            self.workloads_upserted
            or self.workloads_removed
            or self.services_upserted
            or self.services_removed
            or self.endpoints_changed
            or self.policies_upserted
            or self.policies_removed
        )

    @property
    def policies_changed(self) -> bool:
        # A workload's authorization_policies list is part of its policy set too.
        return bool(self.policies_upserted or self.policies_removed or self.workloads_upserted)


@dataclass(slots=True)
class _OrderedKeys:
    """An insertion-ordered set of keys (dict keys), for index buckets."""

    keys: dict[str, None] = field(default_factory=dict)

    def add(self, key: str) -> None:
        self.keys[key] = None

    def discard(self, key: str) -> None:
        self.keys.pop(key, None)

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys)

    def __bool__(self) -> bool:
        return bool(self.keys)


class ProxyState:
    def __init__(self) -> None:
        self.generation = 0
        self._workloads: dict[str, Workload] = {}
        self._workloads_by_addr: dict[NetworkAddress, str] = {}
        self._services: dict[str, Service] = {}
        self._services_by_vip: dict[NetworkAddress, _OrderedKeys] = {}
        self._services_by_hostname: dict[str, _OrderedKeys] = {}
        #: Services with CIDR VIPs, in arrival order (an update moves a service to the end).
        self._services_with_cidrs: dict[str, Service] = {}
        self._endpoints: dict[str, dict[str, Endpoint]] = {}
        self._policies: dict[str, Authorization] = {}
        self._policies_by_namespace: dict[str, _OrderedKeys] = {}

    # ------------------------------------------------------------------ mutation

    def apply(self, batch: UpdateBatch) -> ChangeSet:
        """Apply a converted batch; never fails halfway (its input is already validated)."""
        tracker = _Tracker()
        if batch.replace:
            keep_workloads = {w.uid for w in batch.workloads}
            keep_services = {s.key for s in batch.services}
            keep_policies = {p.key for p in batch.policies}
            for uid in [u for u in self._workloads if u not in keep_workloads]:
                self._remove_workload(uid, tracker)
            for key in [k for k in self._services if k not in keep_services]:
                self._remove_service(key, tracker)
            for key in [k for k in self._policies if k not in keep_policies]:
                self._remove_policy(key, tracker)
        for name in batch.removed_addresses:
            if name in self._workloads:
                self._remove_workload(name, tracker)
            elif name in self._services:
                self._remove_service(name, tracker)
        for key in batch.removed_policies:
            self._remove_policy(key, tracker)
        for service in batch.services:
            self._upsert_service(service, tracker)
        for workload in batch.workloads:
            self._upsert_workload(workload, tracker)
        for policy in batch.policies:
            self._upsert_policy(policy, tracker)
        self.generation += 1
        return tracker.changeset(self.generation)

    def _upsert_workload(self, workload: Workload, t: _Tracker) -> None:
        old = self._workloads.get(workload.uid)
        if old == workload:
            return
        if old is not None:
            self._unindex_workload(old, t)
        self._workloads[workload.uid] = workload
        if workload.network_mode is not NetworkMode.HOST_NETWORK:
            for addr in workload.network_addresses:
                self._workloads_by_addr[addr] = workload.uid
        for svc_key, ports in workload.services.items():
            self._endpoints.setdefault(svc_key, {})[workload.uid] = Endpoint(
                workload_uid=workload.uid, service=svc_key, ports=frozen_map(ports)
            )
            t.endpoints.add(svc_key)
        t.workloads.add(workload.uid)
        t.workloads_removed.discard(workload.uid)

    def _unindex_workload(self, workload: Workload, t: _Tracker) -> None:
        for addr in workload.network_addresses:
            if self._workloads_by_addr.get(addr) == workload.uid:
                del self._workloads_by_addr[addr]
        for svc_key in workload.services:
            bucket = self._endpoints.get(svc_key)
            if bucket is not None and bucket.pop(workload.uid, None) is not None:
                t.endpoints.add(svc_key)
                if not bucket:
                    del self._endpoints[svc_key]

    def _remove_workload(self, uid: str, t: _Tracker) -> None:
        old = self._workloads.pop(uid, None)
        if old is None:
            return
        self._unindex_workload(old, t)
        t.workloads.discard(uid)
        t.workloads_removed.add(uid)

    def _upsert_service(self, service: Service, t: _Tracker) -> None:
        old = self._services.get(service.key)
        if old == service:
            return
        if old is not None:
            self._unindex_service(old)
        self._services[service.key] = service
        for vip in service.vips:
            self._services_by_vip.setdefault(vip, _OrderedKeys()).add(service.key)
        self._services_by_hostname.setdefault(service.hostname, _OrderedKeys()).add(service.key)
        if service.cidr_vips:
            self._services_with_cidrs[service.key] = service
        t.services.add(service.key)
        t.services_removed.discard(service.key)

    def _unindex_service(self, service: Service) -> None:
        self._services_with_cidrs.pop(service.key, None)
        for vip in service.vips:
            bucket = self._services_by_vip.get(vip)
            if bucket is not None:
                bucket.discard(service.key)
                if not bucket:
                    del self._services_by_vip[vip]
        bucket = self._services_by_hostname.get(service.hostname)
        if bucket is not None:
            bucket.discard(service.key)
            if not bucket:
                del self._services_by_hostname[service.hostname]

    def _remove_service(self, key: str, t: _Tracker) -> None:
        old = self._services.pop(key, None)
        if old is None:
            return
        self._unindex_service(old)
        t.services.discard(key)
        t.services_removed.add(key)

    def _upsert_policy(self, policy: Authorization, t: _Tracker) -> None:
        old = self._policies.get(policy.key)
        if old == policy:
            return
        if old is not None:
            self._unindex_policy(old)
        self._policies[policy.key] = policy
        if policy.scope is Scope.NAMESPACE:
            self._policies_by_namespace.setdefault(policy.namespace, _OrderedKeys()).add(policy.key)
        elif policy.scope is Scope.GLOBAL:
            self._policies_by_namespace.setdefault("", _OrderedKeys()).add(policy.key)
        t.policies.add(policy.key)
        t.policies_removed.discard(policy.key)

    def _unindex_policy(self, policy: Authorization) -> None:
        ns = policy.namespace if policy.scope is Scope.NAMESPACE else ""
        bucket = self._policies_by_namespace.get(ns)
        if bucket is not None:
            bucket.discard(policy.key)
            if not bucket:
                del self._policies_by_namespace[ns]

    def _remove_policy(self, key: str, t: _Tracker) -> None:
        old = self._policies.pop(key, None)
        if old is None:
            return
        self._unindex_policy(old)
        t.policies.discard(key)
        t.policies_removed.add(key)

    # ------------------------------------------------------------------ workloads

    def workload(self, uid: str) -> Workload | None:
        return self._workloads.get(uid)

    def workload_by_address(self, addr: NetworkAddress) -> Workload | None:
        uid = self._workloads_by_addr.get(addr)
        return self._workloads.get(uid) if uid is not None else None

    def workload_by_ip(self, network: str, ip: IPAddress) -> Workload | None:
        return self.workload_by_address(NetworkAddress(network, ip))

    def workloads(self) -> Iterable[Workload]:
        return self._workloads.values()

    def workloads_on_node(self, node: str) -> list[Workload]:
        return [w for w in self._workloads.values() if w.node == node]

    def find_workload(self, *, namespace: str, name: str, service_account: str) -> Workload | None:
        """The xDS workload a ZDS ``WorkloadInfo`` names (pod name, namespace, service account)."""
        for w in self._workloads.values():
            if w.namespace == namespace and w.name == name and w.service_account == service_account:
                return w
        return None

    # ------------------------------------------------------------------ services

    def service(self, key: str) -> Service | None:
        return self._services.get(key)

    def services(self) -> Iterable[Service]:
        return self._services.values()

    def services_by_vip(self, vip: NetworkAddress) -> list[Service]:
        bucket = self._services_by_vip.get(vip)
        return [self._services[k] for k in bucket] if bucket else []

    def service_by_vip(self, vip: NetworkAddress, *, prefer_namespace: str = "") -> Service | None:
        """ztunnel's ``get_best_by_vip``: the service at a host VIP (the client's namespace wins
        when several share it), else the best CIDR VIP containing the address.

        ``prefer_namespace`` is the client's namespace ("" when there is no client, as on the
        inbound path): services only visible in their own namespace are hidden from others.
        """
        candidates = [s for s in self.services_by_vip(vip) if _visible_to(s, prefer_namespace)]
        for svc in candidates:
            if svc.namespace == prefer_namespace:
                return svc
        if candidates:
            return candidates[0]
        return self.service_by_cidr_vip(vip, prefer_namespace=prefer_namespace)

    def service_by_cidr_vip(
        self, addr: NetworkAddress, *, prefer_namespace: str = ""
    ) -> Service | None:
        """The service whose CIDR VIP contains ``addr``, ranked as ztunnel ranks them: the
        client's namespace, then the longest prefix, then ``canonical``; the first to arrive
        wins a tie."""
        best: Service | None = None
        best_rank = (False, -1, False)
        for svc in self._services_with_cidrs.values():
            if not _visible_to(svc, prefer_namespace):
                continue
            for cidr in svc.cidr_vips:
                if cidr.network != addr.network or addr.address not in cidr.prefix:
                    continue  # ``in`` is False across address families
                rank = (
                    bool(prefer_namespace) and svc.namespace == prefer_namespace,
                    cidr.prefix.prefixlen,
                    svc.canonical,
                )
                if rank > best_rank:
                    best, best_rank = svc, rank
        return best

    def services_by_hostname(self, hostname: str) -> list[Service]:
        """Every service with this hostname (one per namespace that defines it), oldest first."""
        bucket = self._services_by_hostname.get(hostname)
        return [self._services[k] for k in bucket] if bucket else []

    def service_by_hostname(self, hostname: str, *, prefer_namespace: str = "") -> Service | None:
        """ztunnel's hostname lookup: the client's namespace, then a canonical service."""
        bucket = self._services_by_hostname.get(hostname)
        if not bucket:
            return None
        candidates = [self._services[k] for k in bucket]
        for svc in candidates:
            if svc.namespace == prefer_namespace:
                return svc
        for svc in candidates:
            if svc.canonical:
                return svc
        return candidates[0]

    def endpoints(self, service_key: str) -> Mapping[str, Endpoint]:
        bucket = self._endpoints.get(service_key)
        return MappingProxyType(bucket) if bucket else MappingProxyType({})

    def staged_services(self) -> dict[str, Mapping[str, Endpoint]]:
        """Endpoints whose service has not arrived (yet)."""
        return {
            key: MappingProxyType(eps)
            for key, eps in self._endpoints.items()
            if key not in self._services
        }

    def find_address(
        self, addr: NetworkAddress, *, prefer_namespace: str = ""
    ) -> Workload | Service | None:
        """Workload IP before service VIP, as ztunnel's ``find_address``."""
        return self.workload_by_address(addr) or self.service_by_vip(
            addr, prefer_namespace=prefer_namespace
        )

    # ------------------------------------------------------------------ policies

    def policy(self, key: str) -> Authorization | None:
        return self._policies.get(key)

    def policies(self) -> Iterable[Authorization]:
        return self._policies.values()

    def policies_for(self, workload: Workload) -> list[Authorization]:
        """The applicable set for a destination workload: global, its namespace, its selectors.

        Unknown selector keys are skipped, which is normal while a push is in flight.
        """
        keys: dict[str, None] = {}
        for ns in ("", workload.namespace):
            bucket = self._policies_by_namespace.get(ns)
            if bucket:
                keys.update(dict.fromkeys(bucket))
        for key in workload.authorization_policies:
            if key in self._policies:
                keys[key] = None
        return [self._policies[k] for k in keys]


@dataclass(slots=True)
class _Tracker:
    workloads: set[str] = field(default_factory=set)
    workloads_removed: set[str] = field(default_factory=set)
    services: set[str] = field(default_factory=set)
    services_removed: set[str] = field(default_factory=set)
    endpoints: set[str] = field(default_factory=set)
    policies: set[str] = field(default_factory=set)
    policies_removed: set[str] = field(default_factory=set)

    def changeset(self, generation: int) -> ChangeSet:
        return ChangeSet(
            generation=generation,
            workloads_upserted=frozenset(self.workloads),
            workloads_removed=frozenset(self.workloads_removed),
            services_upserted=frozenset(self.services),
            services_removed=frozenset(self.services_removed),
            endpoints_changed=frozenset(self.endpoints),
            policies_upserted=frozenset(self.policies),
            policies_removed=frozenset(self.policies_removed),
        )


def _visible_to(service: Service, client_namespace: str) -> bool:
    """ztunnel's ``Service::visible_to``; no client namespace means no filtering."""
    return (
        not client_namespace
        or service.visibility is not Visibility.NAMESPACE
        or service.namespace == client_namespace
    )
