"""A sans-I/O delta ADS session with istiod: requests out, responses in, no sockets.

``DeltaSession`` holds what survives reconnects (resource versions, on-demand subscriptions,
readiness) and turns each ``DeltaDiscoveryResponse`` into an ``UpdateBatch`` for the state store
plus exactly one reply (ACK, or NACK naming only the rejected resources). The gRPC adapter
(``xds.client``) moves the messages; it applies the batch *before* it wakes on-demand waiters,
as ztunnel does, so a waiter always finds its resource in the state.

Behaviour follows ztunnel's ``src/xds/client.rs``:

- one initial request per watched type, Address then Authorization; only those carry ``node``;
  each echoes the held ``name -> version`` map in ``initial_resource_versions``;
- in on-demand mode the initial Address request subscribes and unsubscribes ``*`` (subscribe to
  nothing); Authorization is always a wildcard;
- per-resource handling: good resources are applied, failures are collected into one NACK
  ``error_detail`` (google.rpc.Status code 0, ``"name: reason; name: reason"``), no rollback;
  rejected resources are not recorded as held, so istiod re-sends them after a reconnect;
- unknown type URLs are ACKed (and reported in the outcome);
- ready once every non-on-demand type has had an ACKed response.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TypeAlias

from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import message as pb_message
from google.protobuf import struct_pb2
from google.rpc import status_pb2

from ztunnel_py.config import Config
from ztunnel_py.errors import ConversionError
from ztunnel_py.rbac.model import Authorization
from ztunnel_py.state.convert import (
    CidrVip,
    ConvertedService,
    address_from_pb,
    authorization_from_pb,
)
from ztunnel_py.state.model import Service, Workload
from ztunnel_py.state.store import UpdateBatch
from ztunnel_py.xds._pb import authorization_pb2, workload_pb2

ADDRESS_TYPE = "type.googleapis.com/istio.workload.Address"
AUTHORIZATION_TYPE = "type.googleapis.com/istio.security.Authorization"
WATCHED_TYPES = (ADDRESS_TYPE, AUTHORIZATION_TYPE)
WILDCARD = "*"

# xds-protos ships no type stubs, so these are Any to mypy; the names document intent.
DeltaDiscoveryRequest: TypeAlias = discovery_pb2.DeltaDiscoveryRequest
DeltaDiscoveryResponse: TypeAlias = discovery_pb2.DeltaDiscoveryResponse


class Signal(enum.Enum):
    ACK = "ACK"
    NACK = "NACK"


@dataclass(frozen=True, slots=True)
class Rejection:
    """One resource that could not be applied; its ``str`` is the NACK entry."""

    name: str
    reason: str

    def __str__(self) -> str:
        return f"{self.name}: {self.reason}"


@dataclass(frozen=True, slots=True, kw_only=True)
class ResponseOutcome:
    """What one response did, for logs, metrics and on-demand waiters."""

    type_url: str
    nonce: str
    signal: Signal
    rejected: tuple[Rejection, ...] = ()
    unknown_type: bool = False
    applied: int = 0
    removed: int = 0
    satisfied: frozenset[str] = frozenset()  # on-demand keys this response mentioned
    became_ready: bool = False

    @property
    def error_message(self) -> str:
        return "; ".join(str(r) for r in self.rejected)


@dataclass(slots=True)
class _TypeState:
    # name -> version of every resource we hold (or demanded: version "").
    versions: dict[str, str] = field(default_factory=dict)
    # xDS name -> model key, only where they differ (istiod names them the same).
    renamed: dict[str, str] = field(default_factory=dict)
    acked_once: bool = False
    last_nack: ResponseOutcome | None = None


def build_node(config: Config) -> base_pb2.Node:
    """ztunnel's node: id ``ztunnel~ip~pod.ns~ns.svc.cluster.local`` and string metadata."""
    ip = config.instance_ip or "1.1.1.1"
    pod, ns = config.pod_name, config.pod_namespace
    metadata: dict[str, Any] = {
        "NAME": pod,
        "NAMESPACE": ns,
        "INSTANCE_IPS": ip,
        "NODE_NAME": config.node_name or "",
    }
    for key, value in config.proxy_metadata.items():
        # ISTIO_META_* values are strings; ISTIO_METAJSON_* arrive already parsed as JSON.
        metadata[key] = value if _is_json(value) else str(value)
    struct = struct_pb2.Struct()
    struct.update(metadata)
    return base_pb2.Node(id=f"ztunnel~{ip}~{pod}.{ns}~{ns}.svc.cluster.local", metadata=struct)


def _is_json(value: Any) -> bool:
    if value is None or isinstance(value, str | bool | int | float):
        return True
    if isinstance(value, list):
        return all(_is_json(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _is_json(v) for k, v in value.items())
    return False


class DeltaSession:
    """The protocol state of one ztunnel-py's ADS subscription, across connections."""

    def __init__(self, config: Config) -> None:
        self._on_demand = config.xds_on_demand
        self._node = build_node(config)
        self._types = {t: _TypeState() for t in WATCHED_TYPES}
        self._expect = {t for t in WATCHED_TYPES if not self._is_on_demand(t)}
        self._pending: set[str] = set()
        self._cidr_vips: dict[str, tuple[CidrVip, ...]] = {}
        self.last_outcome: ResponseOutcome | None = None

    # ------------------------------------------------------------------ properties

    @property
    def node(self) -> base_pb2.Node:
        return self._node

    @property
    def on_demand(self) -> bool:
        return self._on_demand

    @property
    def ready(self) -> bool:
        return not self._expect

    @property
    def waiting_for(self) -> frozenset[str]:
        """Type URLs that still need a first ACKed response before readiness."""
        return frozenset(self._expect)

    @property
    def pending(self) -> frozenset[str]:
        """On-demand keys requested and not yet answered."""
        return frozenset(self._pending)

    @property
    def cidr_vips(self) -> Mapping[str, tuple[CidrVip, ...]]:
        """Service key -> its CIDR VIPs (kept here until the state model has a field)."""
        return self._cidr_vips

    def versions(self, type_url: str) -> Mapping[str, str]:
        return self._types[type_url].versions

    def _is_on_demand(self, type_url: str) -> bool:
        return self._on_demand and type_url == ADDRESS_TYPE

    # ------------------------------------------------------------------ requests

    def initial_requests(self) -> list[DeltaDiscoveryRequest]:
        """The first requests of a new stream, one per type; call once per connection."""
        requests = []
        for type_url in WATCHED_TYPES:
            req = DeltaDiscoveryRequest(type_url=type_url)
            req.node.CopyFrom(self._node)
            if self._is_on_demand(type_url):
                # xDS cannot say "subscribe to nothing"; sub+unsub of "*" in one message can.
                req.resource_names_subscribe.append(WILDCARD)
                req.resource_names_unsubscribe.append(WILDCARD)
            req.initial_resource_versions.update(self._types[type_url].versions)
            requests.append(req)
        return requests

    def subscribe(self, key: str) -> DeltaDiscoveryRequest:
        """Ask for one Address on demand (``network/ip``, a workload uid or ``ns/hostname``).

        The key is held with an empty version, so a reconnect re-subscribes it and the server
        always sends it.
        """
        self._pending.add(key)
        self._types[ADDRESS_TYPE].versions.setdefault(key, "")
        return DeltaDiscoveryRequest(type_url=ADDRESS_TYPE, resource_names_subscribe=[key])

    def forget_pending(self, key: str) -> None:
        """Nobody waits for ``key`` any more (the caller timed out); the subscription stays."""
        self._pending.discard(key)

    # ------------------------------------------------------------------ responses

    def on_response(
        self, resp: DeltaDiscoveryResponse
    ) -> tuple[UpdateBatch, DeltaDiscoveryRequest]:
        """Convert a response into a batch to apply and the one reply to send."""
        type_url = resp.type_url
        state = self._types.get(type_url)
        if state is None:
            outcome = ResponseOutcome(
                type_url=type_url, nonce=resp.nonce, signal=Signal.ACK, unknown_type=True
            )
            self.last_outcome = outcome
            return UpdateBatch(), self._reply(outcome)

        rejected: list[Rejection] = []
        accepted: list[tuple[str, str]] = []  # (name, version)
        workloads: list[Workload] = []
        services: list[Service] = []
        policies: list[Authorization] = []
        mentioned: set[str] = set()
        for res in resp.resources:
            name = res.name
            mentioned.add(name)
            mentioned.update(res.aliases)
            try:
                converted = self._convert(type_url, res)
            except ConversionError as e:
                rejected.append(Rejection(name, e.reason))
                continue
            accepted.append((name, res.version))
            key: str
            if isinstance(converted, Workload):
                workloads.append(converted)
                key = converted.uid
            elif isinstance(converted, ConvertedService):
                services.append(converted.service)
                key = converted.service.key
                if converted.cidr_vips:
                    self._cidr_vips[key] = converted.cidr_vips
                else:
                    self._cidr_vips.pop(key, None)
            else:
                policies.append(converted)
                key = converted.key
            if key != name:
                state.renamed[name] = key
            else:
                state.renamed.pop(name, None)

        removed_keys: list[str] = []
        for name in resp.removed_resources:
            mentioned.add(name)
            key = state.renamed.pop(name, name)
            removed_keys.append(key)
            state.versions.pop(name, None)
            self._cidr_vips.pop(key, None)
        # Only now record versions: a rejected resource must look "not held" to istiod.
        for name, version in accepted:
            state.versions[name] = version

        if type_url == ADDRESS_TYPE:
            batch = UpdateBatch(
                workloads=tuple(workloads),
                services=tuple(services),
                removed_addresses=tuple(removed_keys),
            )
        else:
            batch = UpdateBatch(policies=tuple(policies), removed_policies=tuple(removed_keys))

        satisfied = frozenset(mentioned & self._pending)
        self._pending -= satisfied
        signal = Signal.NACK if rejected else Signal.ACK
        became_ready = False
        if signal is Signal.ACK:
            state.acked_once = True
            if type_url in self._expect:
                self._expect.discard(type_url)
                became_ready = not self._expect
        outcome = ResponseOutcome(
            type_url=type_url,
            nonce=resp.nonce,
            signal=signal,
            rejected=tuple(rejected),
            applied=len(accepted),
            removed=len(removed_keys),
            satisfied=satisfied,
            became_ready=became_ready,
        )
        if rejected:
            state.last_nack = outcome
        self.last_outcome = outcome
        return batch, self._reply(outcome)

    @staticmethod
    def _convert(
        type_url: str, res: discovery_pb2.Resource
    ) -> Workload | ConvertedService | Authorization:
        if not res.HasField("resource"):
            raise ConversionError(res.name, "XDS payload without resource")
        try:
            if type_url == ADDRESS_TYPE:
                address = workload_pb2.Address.FromString(res.resource.value)
                return address_from_pb(res.name, address)
            policy = authorization_pb2.Authorization.FromString(res.resource.value)
        except pb_message.DecodeError as e:
            raise ConversionError(res.name, f"decode: {e}") from None
        return authorization_from_pb(res.name, policy)

    @staticmethod
    def _reply(outcome: ResponseOutcome) -> DeltaDiscoveryRequest:
        reply = DeltaDiscoveryRequest(type_url=outcome.type_url, response_nonce=outcome.nonce)
        if outcome.rejected:
            reply.error_detail.CopyFrom(status_pb2.Status(code=0, message=outcome.error_message))
        return reply

    # ------------------------------------------------------------------ introspection

    def dump(self) -> dict[str, Any]:
        """The xDS part of ``/config_dump``: per type the held versions and the last NACK."""
        out: dict[str, Any] = {}
        for type_url, state in self._types.items():
            nack = state.last_nack
            out[type_url] = {
                "onDemand": self._is_on_demand(type_url),
                "acked": state.acked_once,
                "resources": dict(sorted(state.versions.items())),
                "lastNack": None
                if nack is None
                else {
                    "nonce": nack.nonce,
                    "rejected": [{"name": r.name, "reason": r.reason} for r in nack.rejected],
                },
            }
        return {
            "ready": self.ready,
            "pendingOnDemand": sorted(self._pending),
            "types": out,
            "cidrVips": {k: [str(v) for v in vs] for k, vs in sorted(self._cidr_vips.items())},
        }
