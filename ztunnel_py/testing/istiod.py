"""A fake istiod for tests and benchmarks: delta ADS (Address, Authorization) over real TLS.

It is a real ``grpc.aio`` server on 127.0.0.1 (a free port), serving
``AggregatedDiscoveryService/DeltaAggregatedResources`` the way istiod does for ztunnel:

- resources come from a ztunnel local-config YAML (parsed by ``xds.local``) or from model
  objects, converted back to protobuf here; Address resources carry a content-hash version,
  Authorization resources none;
- wildcard subscriptions get everything; on-demand ones (``*`` subscribed and unsubscribed)
  get only what they ask for, matched by name or alias, with aliases set as istiod does;
- on reconnect, ``initial_resource_versions`` is honoured: only changed resources are sent, and
  held names that no longer exist are removed;
- tests can push updates and removals, push malformed resources, drop or rotate streams
  (UNAVAILABLE "received prior goaway", as istiod's max-connection-age), require a bearer token
  (PERMISSION_DENIED "authorization failed"), and read back every request received.

Other services (the fake CA in ``testing.ca``) can share the server through
``extra_servicers``, e.g. ``FakeIstiod(extra_servicers=[fake_ca.add_to_server])``.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.protobuf import empty_pb2
from google.protobuf.message import Message

from ztunnel_py.ip import IPNetwork
from ztunnel_py.protos import authorization_pb2 as az
from ztunnel_py.protos import workload_pb2 as wl
from ztunnel_py.rbac.model import Authorization, Match, StringMatch, StringMatchKind
from ztunnel_py.state.model import (
    AppTunnelProtocol,
    GatewayAddress,
    HealthStatus,
    InboundProtocol,
    IpFamily,
    LoadBalancerHealthPolicy,
    LoadBalancerMode,
    LoadBalancerScope,
    NamespacedHostname,
    NetworkMode,
    Service,
    Visibility,
    Workload,
)
from ztunnel_py.state.store import UpdateBatch
from ztunnel_py.testing.pki import CertificateAuthority, IssuedCert
from ztunnel_py.xds.handlers import ADDRESS_TYPE, AUTHORIZATION_TYPE
from ztunnel_py.xds.local import parse_local_config

ISTIOD_HOSTNAME = "istiod.istio-system.svc"
TYPE_PREFIX = "type.googleapis.com/"
GOAWAY_DETAILS = "received prior goaway: code: NO_ERROR"

# --- model -> protobuf (the reverse of state.convert) ---------------------------------------

_PROTOCOLS = {InboundProtocol.TCP: wl.NONE, InboundProtocol.HBONE: wl.HBONE}
_NETWORK_MODES = {NetworkMode.STANDARD: wl.STANDARD, NetworkMode.HOST_NETWORK: wl.HOST_NETWORK}
_STATUSES = {HealthStatus.HEALTHY: wl.HEALTHY, HealthStatus.UNHEALTHY: wl.UNHEALTHY}
_WORKLOAD_TYPES = {"deployment": wl.DEPLOYMENT, "cronjob": wl.CRONJOB, "pod": wl.POD, "job": wl.JOB}
_APP_TUNNEL = {
    AppTunnelProtocol.NONE: wl.ApplicationTunnel.NONE,
    AppTunnelProtocol.PROXY: wl.ApplicationTunnel.PROXY,
}
_LB_SCOPES = {
    LoadBalancerScope.REGION: wl.LoadBalancing.REGION,
    LoadBalancerScope.ZONE: wl.LoadBalancing.ZONE,
    LoadBalancerScope.SUBZONE: wl.LoadBalancing.SUBZONE,
    LoadBalancerScope.NODE: wl.LoadBalancing.NODE,
    LoadBalancerScope.CLUSTER: wl.LoadBalancing.CLUSTER,
    LoadBalancerScope.NETWORK: wl.LoadBalancing.NETWORK,
}
_LB_MODES = {
    LoadBalancerMode.STANDARD: wl.LoadBalancing.UNSPECIFIED_MODE,
    LoadBalancerMode.STRICT: wl.LoadBalancing.STRICT,
    LoadBalancerMode.FAILOVER: wl.LoadBalancing.FAILOVER,
    LoadBalancerMode.PASSTHROUGH: wl.LoadBalancing.PASSTHROUGH,
}
_LB_HEALTH = {
    LoadBalancerHealthPolicy.ONLY_HEALTHY: wl.LoadBalancing.ONLY_HEALTHY,
    LoadBalancerHealthPolicy.ALLOW_ALL: wl.LoadBalancing.ALLOW_ALL,
}
_IP_FAMILIES = {
    None: wl.AUTOMATIC,
    IpFamily.IPV4: wl.IPV4_ONLY,
    IpFamily.IPV6: wl.IPV6_ONLY,
    IpFamily.DUAL: wl.DUAL,
}
_VISIBILITIES = {Visibility.PUBLIC: wl.Service.PUBLIC, Visibility.NAMESPACE: wl.Service.NAMESPACE}


def _gateway_to_pb(gw: GatewayAddress) -> wl.GatewayAddress:
    out = wl.GatewayAddress(hbone_mtls_port=gw.hbone_mtls_port)
    if isinstance(gw.destination, NamespacedHostname):
        out.hostname.namespace = gw.destination.namespace
        out.hostname.hostname = gw.destination.hostname
    else:
        out.address.network = gw.destination.network
        out.address.address = gw.destination.address.packed
    return out


def workload_to_pb(w: Workload) -> wl.Workload:
    out = wl.Workload(
        uid=w.uid,
        name=w.name,
        namespace=w.namespace,
        addresses=[ip.packed for ip in w.workload_ips],
        hostname=w.hostname,
        network=w.network,
        tunnel_protocol=_PROTOCOLS[w.protocol],
        trust_domain=w.trust_domain,
        service_account=w.service_account,
        node=w.node,
        canonical_name=w.canonical_name,
        canonical_revision=w.canonical_revision,
        workload_type=_WORKLOAD_TYPES.get(w.workload_type, wl.DEPLOYMENT),
        workload_name=w.workload_name,
        native_tunnel=w.native_tunnel,
        authorization_policies=list(w.authorization_policies),
        status=_STATUSES[w.status],
        cluster_id=w.cluster_id,
        network_mode=_NETWORK_MODES[w.network_mode],
    )
    if w.waypoint is not None:
        out.waypoint.CopyFrom(_gateway_to_pb(w.waypoint))
    if w.network_gateway is not None:
        out.network_gateway.CopyFrom(_gateway_to_pb(w.network_gateway))
    if w.application_tunnel is not None:
        out.application_tunnel.protocol = _APP_TUNNEL[w.application_tunnel.protocol]
        out.application_tunnel.port = w.application_tunnel.port or 0
    for key, ports in w.services.items():
        out.services[key].ports.extend(
            wl.Port(service_port=sp, target_port=tp) for sp, tp in ports.items()
        )
    if w.locality.region or w.locality.zone or w.locality.subzone:
        out.locality.region = w.locality.region
        out.locality.zone = w.locality.zone
        out.locality.subzone = w.locality.subzone
    if w.capacity != 1:
        out.capacity.value = w.capacity
    return out


def service_to_pb(s: Service) -> wl.Service:
    out = wl.Service(
        name=s.name,
        namespace=s.namespace,
        hostname=s.hostname,
        addresses=[wl.NetworkAddress(network=v.network, address=v.address.packed) for v in s.vips],
        ports=[wl.Port(service_port=sp, target_port=tp) for sp, tp in s.ports.items()],
        subject_alt_names=list(s.subject_alt_names),
        ip_families=_IP_FAMILIES[s.ip_families],
        canonical=s.canonical,
        visibility=_VISIBILITIES[s.visibility],
    )
    for cidr in s.cidr_vips:
        out.addresses.append(
            wl.NetworkAddress(
                network=cidr.network,
                address=cidr.prefix.network_address.packed,
                length=cidr.prefix.prefixlen,
            )
        )
    if s.waypoint is not None:
        out.waypoint.CopyFrom(_gateway_to_pb(s.waypoint))
    for ww in s.weighted_waypoints:
        out.weighted_waypoints.add(destination=_gateway_to_pb(ww.destination), weight=ww.weight)
    if s.load_balancer is not None:
        lb = s.load_balancer
        out.load_balancing.routing_preference.extend(_LB_SCOPES[x] for x in lb.routing_preferences)
        out.load_balancing.mode = _LB_MODES[lb.mode]
        out.load_balancing.health_policy = _LB_HEALTH[lb.health_policy]
    return out


def _string_match_to_pb(m: StringMatch) -> az.StringMatch:
    if m.kind is StringMatchKind.EXACT:
        return az.StringMatch(exact=m.value)
    if m.kind is StringMatchKind.PREFIX:
        return az.StringMatch(prefix=m.value)
    if m.kind is StringMatchKind.SUFFIX:
        return az.StringMatch(suffix=m.value)
    return az.StringMatch(presence=empty_pb2.Empty())


def _prefix_to_pb(n: IPNetwork) -> az.Address:
    return az.Address(address=n.network_address.packed, length=n.prefixlen)


def _match_to_pb(m: Match) -> az.Match:
    return az.Match(
        namespaces=[_string_match_to_pb(x) for x in m.namespaces],
        not_namespaces=[_string_match_to_pb(x) for x in m.not_namespaces],
        service_accounts=[
            az.ServiceAccountMatch(namespace=x.namespace, serviceAccount=x.service_account)
            for x in m.service_accounts
        ],
        not_service_accounts=[
            az.ServiceAccountMatch(namespace=x.namespace, serviceAccount=x.service_account)
            for x in m.not_service_accounts
        ],
        principals=[_string_match_to_pb(x) for x in m.principals],
        not_principals=[_string_match_to_pb(x) for x in m.not_principals],
        source_ips=[_prefix_to_pb(x) for x in m.source_ips],
        not_source_ips=[_prefix_to_pb(x) for x in m.not_source_ips],
        destination_ips=[_prefix_to_pb(x) for x in m.destination_ips],
        not_destination_ips=[_prefix_to_pb(x) for x in m.not_destination_ips],
        destination_ports=list(m.destination_ports),
        not_destination_ports=list(m.not_destination_ports),
    )


def authorization_to_pb(a: Authorization) -> az.Authorization:
    scope = {
        "Global": az.GLOBAL,
        "Namespace": az.NAMESPACE,
        "WorkloadSelector": az.WORKLOAD_SELECTOR,
    }
    return az.Authorization(
        name=a.name,
        namespace=a.namespace,
        scope=scope[a.scope.value],
        action=az.DENY if a.action.value == "Deny" else az.ALLOW,
        dry_run=a.dry_run,
        rules=[
            az.Rule(
                clauses=[az.Clause(matches=[_match_to_pb(m) for m in clause]) for clause in rule]
            )
            for rule in a.rules
        ],
    )


# --- the server --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StoredResource:
    name: str
    version: str
    type_name: str  # e.g. "istio.workload.Address"
    payload: bytes  # the serialized message (or deliberate garbage)
    aliases: tuple[str, ...] = ()

    def to_pb(self, *, with_aliases: bool) -> discovery_pb2.Resource:
        res = discovery_pb2.Resource(name=self.name, version=self.version)
        if with_aliases:
            res.aliases.extend(self.aliases)
        res.resource.type_url = TYPE_PREFIX + self.type_name
        res.resource.value = self.payload
        return res


@dataclass(frozen=True, slots=True)
class RecordedRequest:
    """One ``DeltaDiscoveryRequest`` as the fake received it."""

    stream: int
    type_url: str
    node_id: str
    nonce: str
    error: str | None
    subscribe: tuple[str, ...]
    unsubscribe: tuple[str, ...]
    initial_versions: dict[str, str]
    headers: dict[str, str]

    @property
    def is_initial(self) -> bool:
        return bool(self.node_id)

    @property
    def is_ack(self) -> bool:
        return bool(self.nonce) and self.error is None

    @property
    def is_nack(self) -> bool:
        return bool(self.nonce) and self.error is not None


@dataclass(frozen=True, slots=True)
class SentResponse:
    """One response the fake wrote (names only)."""

    stream: int
    type_url: str
    nonce: str
    names: tuple[str, ...]
    removed: tuple[str, ...]


@dataclass(slots=True)
class _Subscription:
    wildcard: bool = False
    names: set[str] = field(default_factory=set)


class _Close:
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        self.code = code
        self.details = details


@dataclass(slots=True)
class _Stream:
    id: int
    queue: asyncio.Queue[discovery_pb2.DeltaDiscoveryResponse | _Close]
    subscriptions: dict[str, _Subscription] = field(default_factory=dict)


def _version(payload: bytes) -> str:
    return hashlib.sha256(payload).hexdigest()[:16]


def _serialize(msg: Message) -> bytes:
    return msg.SerializeToString(deterministic=True)


class FakeIstiod(ads_pb2_grpc.AggregatedDiscoveryServiceServicer):  # type: ignore[misc]
    """See the module docstring. Use ``async with FakeIstiod(...) as istiod:``."""

    def __init__(
        self,
        *,
        config_yaml: str | None = None,
        batch: UpdateBatch | None = None,
        token: str | None = None,
        authority: CertificateAuthority | None = None,
        extra_servicers: Sequence[Callable[[grpc.aio.Server], None]] = (),
        dns_names: Sequence[str] = (ISTIOD_HOSTNAME, "localhost"),
    ) -> None:
        self.authority = authority or CertificateAuthority.create(common_name="fake istiod root")
        self.server_cert: IssuedCert = self.authority.issue_server(
            dns_names=list(dns_names), ip_addresses=["127.0.0.1"]
        )
        self.token = token
        self.requests: list[RecordedRequest] = []
        self.responses: list[SentResponse] = []
        self.streams_opened = 0
        self.port = 0
        self._extra_servicers = tuple(extra_servicers)
        self._server: grpc.aio.Server | None = None
        self._resources: dict[str, dict[str, StoredResource]] = {
            ADDRESS_TYPE: {},
            AUTHORIZATION_TYPE: {},
        }
        self._streams: dict[int, _Stream] = {}
        self._stream_ids = itertools.count(1)
        self._nonces = itertools.count(1)
        self._changed = asyncio.Condition()
        if config_yaml is not None:
            self._store(parse_local_config(config_yaml, source="FakeIstiod"))
        if batch is not None:
            self._store(batch)

    # ------------------------------------------------------------------ lifecycle

    @property
    def address(self) -> str:
        """``XDS_ADDRESS`` for a client (verify with ``root_pem``)."""
        return f"https://127.0.0.1:{self.port}"

    @property
    def root_pem(self) -> bytes:
        return self.authority.root_pem

    async def start(self) -> None:
        """Listen (again) on 127.0.0.1; a restart keeps the port so clients find it."""
        server = grpc.aio.server()
        ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(self, server)
        for add in self._extra_servicers:
            add(server)
        creds = grpc.ssl_server_credentials(
            [(self.server_cert.key_pem, self.server_cert.chain_pem)]
        )
        self.port = server.add_secure_port(f"127.0.0.1:{self.port}", creds)
        await server.start()
        self._server = server

    async def stop(self, grace: float | None = None) -> None:
        """Stop serving (streams end with UNAVAILABLE); ``start()`` again to come back."""
        if self._server is not None:
            for stream in list(self._streams.values()):
                stream.queue.put_nowait(_Close(grpc.StatusCode.UNAVAILABLE, "server shutting down"))
            await self._server.stop(grace)
            self._server = None

    async def __aenter__(self) -> FakeIstiod:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # ------------------------------------------------------------------ test controls

    def resource_names(self, type_url: str) -> set[str]:
        return set(self._resources[type_url])

    def version(self, type_url: str, name: str) -> str:
        return self._resources[type_url][name].version

    def push(
        self,
        batch: UpdateBatch,
        *,
        raw: Sequence[tuple[str, str, Message | bytes]] = (),
    ) -> None:
        """Upsert and remove model objects and push the changes to every subscribed stream.

        ``raw`` adds ``(type_url, name, message or bytes)`` resources to the same responses,
        e.g. a malformed Address among good ones.
        """
        changed = self._store(batch)
        for type_url, name, payload in raw:
            self._resources[type_url][name] = self._raw(type_url, name, payload)
            changed[type_url].append(name)
        removed = {
            ADDRESS_TYPE: [n for n in batch.removed_addresses if self._drop(ADDRESS_TYPE, n)],
            AUTHORIZATION_TYPE: [
                n for n in batch.removed_policies if self._drop(AUTHORIZATION_TYPE, n)
            ],
        }
        for type_url in (ADDRESS_TYPE, AUTHORIZATION_TYPE):
            self._fan_out(type_url, changed[type_url], removed[type_url])

    def push_service(self, service: Service) -> None:
        """A service with CIDR VIPs, which the local-config model cannot carry."""
        cidrs = service.cidr_vips
        msg = wl.Address(service=service_to_pb(service))
        stored = self._address_resource(service.key, msg, service)
        # istiod's alias for a CIDR VIP is network/ip/len.
        aliases = stored.aliases + tuple(str(c) for c in cidrs)
        stored = StoredResource(
            stored.name, stored.version, stored.type_name, stored.payload, aliases
        )
        self._resources[ADDRESS_TYPE][stored.name] = stored
        self._fan_out(ADDRESS_TYPE, [stored.name], [])

    @staticmethod
    def _raw(type_url: str, name: str, payload: Message | bytes) -> StoredResource:
        data = payload if isinstance(payload, bytes) else _serialize(payload)
        return StoredResource(name, _version(data), type_url.removeprefix(TYPE_PREFIX), data)

    def remove(self, type_url: str, *names: str) -> None:
        dropped = [n for n in names if self._drop(type_url, n)]
        self._fan_out(type_url, [], dropped)

    def drop_streams(self, details: str = "stream reset by fake istiod") -> None:
        """End every stream with UNAVAILABLE (a connection error from the client's view)."""
        self._close_all(grpc.StatusCode.UNAVAILABLE, details)

    def rotate(self) -> None:
        """End every stream as istiod's max-connection-age does (the client reconnects at once)."""
        self._close_all(grpc.StatusCode.UNAVAILABLE, GOAWAY_DETAILS)

    def close_streams(self, code: grpc.StatusCode, details: str) -> None:
        self._close_all(code, details)

    async def wait_for(
        self, predicate: Callable[[RecordedRequest], bool], *, count: int = 1
    ) -> list[RecordedRequest]:
        """Wait until ``count`` recorded requests satisfy ``predicate`` (bounded by the test)."""
        async with self._changed:
            await self._changed.wait_for(
                lambda: sum(1 for r in self.requests if predicate(r)) >= count
            )
        return [r for r in self.requests if predicate(r)]

    async def wait_for_streams(self, count: int) -> None:
        async with self._changed:
            await self._changed.wait_for(lambda: self.streams_opened >= count)

    # ------------------------------------------------------------------ storage

    def _store(self, batch: UpdateBatch) -> dict[str, list[str]]:
        changed: dict[str, list[str]] = {ADDRESS_TYPE: [], AUTHORIZATION_TYPE: []}
        addresses = self._resources[ADDRESS_TYPE]
        for w in batch.workloads:
            stored = self._address_resource(w.uid, wl.Address(workload=workload_to_pb(w)), w)
            if addresses.get(w.uid) != stored:
                addresses[w.uid] = stored
                changed[ADDRESS_TYPE].append(w.uid)
        for s in batch.services:
            stored = self._address_resource(s.key, wl.Address(service=service_to_pb(s)), s)
            if addresses.get(s.key) != stored:
                addresses[s.key] = stored
                changed[ADDRESS_TYPE].append(s.key)
        policies = self._resources[AUTHORIZATION_TYPE]
        for p in batch.policies:
            payload = _serialize(authorization_to_pb(p))
            # istiod sets no version on Authorization resources.
            stored = StoredResource(p.key, "", "istio.security.Authorization", payload)
            if policies.get(p.key) != stored:
                policies[p.key] = stored
                changed[AUTHORIZATION_TYPE].append(p.key)
        return changed

    @staticmethod
    def _address_resource(name: str, msg: wl.Address, obj: Workload | Service) -> StoredResource:
        payload = _serialize(msg)
        if isinstance(obj, Workload):
            aliases = tuple(str(a) for a in obj.network_addresses)
        else:
            aliases = tuple(str(v) for v in obj.vips)
        return StoredResource(name, _version(payload), "istio.workload.Address", payload, aliases)

    def _drop(self, type_url: str, name: str) -> bool:
        return self._resources[type_url].pop(name, None) is not None

    def _close_all(self, code: grpc.StatusCode, details: str) -> None:
        for stream in list(self._streams.values()):
            stream.queue.put_nowait(_Close(code, details))

    # ------------------------------------------------------------------ protocol

    def _matching(self, type_url: str, key: str) -> list[StoredResource]:
        store = self._resources[type_url]
        if key in store:
            return [store[key]]
        return [r for r in store.values() if key in r.aliases]

    def _response(
        self,
        type_url: str,
        resources: Iterable[StoredResource],
        removed: Iterable[str],
        *,
        with_aliases: bool,
    ) -> discovery_pb2.DeltaDiscoveryResponse:
        return discovery_pb2.DeltaDiscoveryResponse(
            type_url=type_url,
            nonce=str(next(self._nonces)),
            resources=[r.to_pb(with_aliases=with_aliases) for r in resources],
            removed_resources=list(removed),
        )

    def _fan_out(self, type_url: str, changed: Sequence[str], removed: Sequence[str]) -> None:
        if not changed and not removed:
            return
        store = self._resources[type_url]
        for stream in self._streams.values():
            sub = stream.subscriptions.get(type_url)
            if sub is None:
                continue
            if sub.wildcard:
                send = [store[n] for n in changed]
                gone = list(removed)
            else:
                send = [store[n] for n in changed if n in sub.names]
                gone = [n for n in removed if n in sub.names]
            if send or gone:
                resp = self._response(type_url, send, gone, with_aliases=not sub.wildcard)
                stream.queue.put_nowait(resp)

    def _initial(self, stream: _Stream, req: discovery_pb2.DeltaDiscoveryRequest) -> None:
        type_url = req.type_url
        subscribe, unsubscribe = (
            set(req.resource_names_subscribe),
            set(req.resource_names_unsubscribe),
        )
        held = dict(req.initial_resource_versions)
        wildcard = (not subscribe and not unsubscribe) or (
            "*" in subscribe and "*" not in unsubscribe
        )
        sub = _Subscription(wildcard=wildcard)
        stream.subscriptions[type_url] = sub
        store = self._resources.get(type_url)
        if store is None:
            stream.queue.put_nowait(self._response(type_url, [], [], with_aliases=False))
            return
        if wildcard:
            send = [r for name, r in store.items() if held.get(name) != r.version or not r.version]
            gone = [name for name in held if name not in store]
            stream.queue.put_nowait(self._response(type_url, send, gone, with_aliases=False))
            return
        # On demand: held names (including "network/ip" keys) are the subscription.
        names = (subscribe - {"*"}) | set(held)
        send_by_name: dict[str, StoredResource] = {}
        for key in names:
            for res in self._matching(type_url, key):
                sub.names.add(res.name)
                if held.get(res.name) != res.version:
                    send_by_name[res.name] = res
        sub.names.update(names)
        gone = [n for n in held if not self._matching(type_url, n)]
        stream.queue.put_nowait(
            self._response(type_url, send_by_name.values(), gone, with_aliases=True)
        )

    def _on_demand(self, stream: _Stream, req: discovery_pb2.DeltaDiscoveryRequest) -> None:
        sub = stream.subscriptions.setdefault(req.type_url, _Subscription())
        for name in req.resource_names_unsubscribe:
            sub.names.discard(name)
        send: dict[str, StoredResource] = {}
        for key in req.resource_names_subscribe:
            sub.names.add(key)
            if req.type_url in self._resources:
                for res in self._matching(req.type_url, key):
                    sub.names.add(res.name)
                    send[res.name] = res
        # istiod always answers an explicit request, possibly with nothing.
        stream.queue.put_nowait(self._response(req.type_url, send.values(), [], with_aliases=True))

    async def _record(
        self, stream: _Stream, req: discovery_pb2.DeltaDiscoveryRequest, headers: dict[str, str]
    ) -> None:
        recorded = RecordedRequest(
            stream=stream.id,
            type_url=req.type_url,
            node_id=req.node.id,
            nonce=req.response_nonce,
            error=req.error_detail.message if req.HasField("error_detail") else None,
            subscribe=tuple(req.resource_names_subscribe),
            unsubscribe=tuple(req.resource_names_unsubscribe),
            initial_versions=dict(req.initial_resource_versions),
            headers=headers,
        )
        async with self._changed:
            self.requests.append(recorded)
            self._changed.notify_all()

    async def _read_requests(
        self,
        stream: _Stream,
        requests: Any,
        headers: dict[str, str],
    ) -> None:
        async for req in requests:
            await self._record(stream, req, headers)
            if req.response_nonce:
                continue  # ACK or NACK: nothing to send
            if req.type_url not in stream.subscriptions:
                self._initial(stream, req)
            else:
                self._on_demand(stream, req)

    async def DeltaAggregatedResources(
        self, request_iterator: Any, context: grpc.aio.ServicerContext[Any, Any]
    ) -> None:
        headers = {
            k: (v.decode() if isinstance(v, bytes) else v)
            for k, v in (context.invocation_metadata() or ())
        }
        if self.token is not None and headers.get("authorization") != f"Bearer {self.token}":
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, "authorization failed")
        stream = _Stream(next(self._stream_ids), asyncio.Queue())
        self._streams[stream.id] = stream
        async with self._changed:
            self.streams_opened += 1
            self._changed.notify_all()
        reader = asyncio.create_task(self._read_requests(stream, request_iterator, headers))
        try:
            while True:
                getter = asyncio.ensure_future(stream.queue.get())
                done, _ = await asyncio.wait({getter, reader}, return_when=asyncio.FIRST_COMPLETED)
                if getter not in done:
                    getter.cancel()
                    return  # the client half-closed or the reader failed
                item = getter.result()
                if isinstance(item, _Close):
                    await context.abort(item.code, item.details)
                    return
                await context.write(item)
                self.responses.append(
                    SentResponse(
                        stream=stream.id,
                        type_url=item.type_url,
                        nonce=item.nonce,
                        names=tuple(r.name for r in item.resources),
                        removed=tuple(item.removed_resources),
                    )
                )
        finally:
            self._streams.pop(stream.id, None)
            reader.cancel()
            if reader.done() and not reader.cancelled():
                reader.exception()  # retrieved: a reset stream is not an error of the fake
