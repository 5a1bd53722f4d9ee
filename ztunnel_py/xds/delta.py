"""A sans-I/O delta ADS session: requests out, responses in, no sockets, no resource types.

``DeltaSession`` holds what survives reconnects (resource versions, on-demand subscriptions,
readiness) and turns each ``DeltaDiscoveryResponse`` into the state update its type's handler
builds, plus exactly one reply (ACK, or NACK naming only the rejected resources). What the
resources mean is the handlers' business (``xds.handlers``: Address, Authorization); the gRPC
adapter (``xds.client``) moves the messages and applies the update *before* it wakes on-demand
waiters, as ztunnel does, so a waiter always finds its resource in the state.

Behaviour follows ztunnel's ``src/xds/client.rs``:

- one initial request per subscribed type, in the order given; only those carry ``node``;
  each echoes the held ``name -> version`` map in ``initial_resource_versions``;
- an on-demand type's initial request subscribes and unsubscribes ``*`` (subscribe to
  nothing); the other types are wildcards;
- per-resource handling: good resources are applied, failures are collected into one NACK
  ``error_detail`` (google.rpc.Status code 0, ``"name: reason; name: reason"``), no rollback;
  rejected resources are not recorded as held, so istiod re-sends them after a reconnect;
- unknown type URLs are ACKed (and reported in the outcome);
- ready once every type that is not on demand has had an ACKed response.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeAlias, TypeVar

from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.rpc import status_pb2

from ztunnel_py.errors import ConversionError
from ztunnel_py.state.store import UpdateBatch

WILDCARD = "*"

# xds-protos ships no type stubs, so these are Any to mypy; the names document intent.
DeltaDiscoveryRequest: TypeAlias = discovery_pb2.DeltaDiscoveryRequest
DeltaDiscoveryResponse: TypeAlias = discovery_pb2.DeltaDiscoveryResponse

_R = TypeVar("_R")


class ResourceHandler(Protocol[_R]):
    """One resource type: decode a resource, name its state key, build the state update."""

    @property
    def type_url(self) -> str: ...

    def decode(self, name: str, payload: bytes) -> _R:
        """The resource named ``name``; ``ConversionError`` when it cannot be used."""
        ...

    def key(self, resource: _R) -> str:
        """The resource's key in the state (usually its xDS name)."""
        ...

    def updates(self, resources: Sequence[_R], removed: Sequence[str]) -> UpdateBatch:
        """One response's accepted resources and removed keys as one state update."""
        ...


@dataclass(frozen=True, slots=True)
class Subscription:
    handler: ResourceHandler[Any]
    #: Subscribe to named resources as they are needed (``subscribe``), not to ``*``.
    on_demand: bool = False


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
    subscription: Subscription
    # name -> version of every resource we hold (or demanded: version "").
    versions: dict[str, str] = field(default_factory=dict)
    # xDS name -> state key, only where they differ (istiod names them the same).
    renamed: dict[str, str] = field(default_factory=dict)
    acked_once: bool = False
    last_ack: ResponseOutcome | None = None
    last_nack: ResponseOutcome | None = None


class DeltaSession:
    """The protocol state of one ADS subscription set, across connections."""

    def __init__(self, node: base_pb2.Node, subscriptions: Sequence[Subscription]) -> None:
        self._node = node
        self._types = {s.handler.type_url: _TypeState(s) for s in subscriptions}
        self._expect = {s.handler.type_url for s in subscriptions if not s.on_demand}
        self._pending: set[str] = set()
        self.last_outcome: ResponseOutcome | None = None

    # ------------------------------------------------------------------ properties

    @property
    def node(self) -> base_pb2.Node:
        return self._node

    @property
    def on_demand(self) -> bool:
        """Whether any type is subscribed on demand."""
        return any(s.subscription.on_demand for s in self._types.values())

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

    def versions(self, type_url: str) -> Mapping[str, str]:
        return self._types[type_url].versions

    # ------------------------------------------------------------------ requests

    def initial_requests(self) -> list[DeltaDiscoveryRequest]:
        """The first requests of a new stream, one per type; call once per connection."""
        requests = []
        for type_url, state in self._types.items():
            req = DeltaDiscoveryRequest(type_url=type_url)
            req.node.CopyFrom(self._node)
            if state.subscription.on_demand:
                # xDS cannot say "subscribe to nothing"; sub+unsub of "*" in one message can.
                req.resource_names_subscribe.append(WILDCARD)
                req.resource_names_unsubscribe.append(WILDCARD)
            req.initial_resource_versions.update(state.versions)
            requests.append(req)
        return requests

    def subscribe(self, type_url: str, key: str) -> DeltaDiscoveryRequest:
        """Ask for one resource of an on-demand type.

        The key is held with an empty version, so a reconnect re-subscribes it and the server
        always sends it.
        """
        self._pending.add(key)
        self._types[type_url].versions.setdefault(key, "")
        return DeltaDiscoveryRequest(type_url=type_url, resource_names_subscribe=[key])

    def forget_pending(self, key: str) -> None:
        """Nobody waits for ``key`` any more (the caller timed out); the subscription stays."""
        self._pending.discard(key)

    # ------------------------------------------------------------------ responses

    def on_response(
        self, resp: DeltaDiscoveryResponse
    ) -> tuple[UpdateBatch, DeltaDiscoveryRequest]:
        """Convert a response into a state update to apply and the one reply to send."""
        type_url = resp.type_url
        state = self._types.get(type_url)
        if state is None:
            outcome = ResponseOutcome(
                type_url=type_url, nonce=resp.nonce, signal=Signal.ACK, unknown_type=True
            )
            self.last_outcome = outcome
            return UpdateBatch(), self._reply(outcome)

        handler = state.subscription.handler
        rejected: list[Rejection] = []
        accepted: list[tuple[str, str]] = []  # (name, version)
        resources: list[Any] = []
        mentioned: set[str] = set()
        for res in resp.resources:
            name = res.name
            mentioned.add(name)
            mentioned.update(res.aliases)
            try:
                if not res.HasField("resource"):
                    raise ConversionError(name, "XDS payload without resource")
                resource = handler.decode(name, res.resource.value)
            except ConversionError as e:
                rejected.append(Rejection(name, e.reason))
                continue
            accepted.append((name, res.version))
            resources.append(resource)
            key = handler.key(resource)
            if key != name:
                state.renamed[name] = key
            else:
                state.renamed.pop(name, None)

        removed_keys: list[str] = []
        for name in resp.removed_resources:
            mentioned.add(name)
            removed_keys.append(state.renamed.pop(name, name))
            state.versions.pop(name, None)
        # Only now record versions: a rejected resource must look "not held" to istiod.
        for name, version in accepted:
            state.versions[name] = version
        update = handler.updates(resources, removed_keys)

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
        else:
            state.last_ack = outcome
        self.last_outcome = outcome
        return update, self._reply(outcome)

    @staticmethod
    def _reply(outcome: ResponseOutcome) -> DeltaDiscoveryRequest:
        reply = DeltaDiscoveryRequest(type_url=outcome.type_url, response_nonce=outcome.nonce)
        if outcome.rejected:
            reply.error_detail.CopyFrom(status_pb2.Status(code=0, message=outcome.error_message))
        return reply

    # ------------------------------------------------------------------ introspection

    def dump(self) -> dict[str, Any]:
        """The xDS part of ``/config_dump``: per type the held versions, the last ACK and the
        last NACK (nonce, what applied, what was refused and why)."""
        out: dict[str, Any] = {}
        for type_url, state in self._types.items():
            nack = state.last_nack
            ack = state.last_ack
            out[type_url] = {
                "onDemand": state.subscription.on_demand,
                "acked": state.acked_once,
                "resources": dict(sorted(state.versions.items())),
                "lastAck": None
                if ack is None
                else {"nonce": ack.nonce, "applied": ack.applied, "removed": ack.removed},
                "lastNack": None
                if nack is None
                else {
                    "nonce": nack.nonce,
                    "applied": nack.applied,
                    "rejected": [{"name": r.name, "reason": r.reason} for r in nack.rejected],
                },
            }
        return {"ready": self.ready, "pendingOnDemand": sorted(self._pending), "types": out}
