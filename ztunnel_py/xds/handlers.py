"""ztunnel's two xDS resource types, one handler each: resources in, state updates out.

As ztunnel's ``Handler<T>`` per type: the generic session (``xds.delta``) keeps nonces,
versions and ACK/NACK; a handler decodes one resource (a ``ConversionError`` becomes that
resource's NACK entry), names its key in the state model, and turns the accepted and removed
resources of one response into one ``UpdateBatch``. ``istio_session`` subscribes to both.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from envoy.config.core.v3 import base_pb2
from google.protobuf import message as pb_message
from google.protobuf import struct_pb2

from ztunnel_py.config import Config
from ztunnel_py.errors import ConversionError
from ztunnel_py.protos import authorization_pb2, workload_pb2
from ztunnel_py.rbac.model import Authorization
from ztunnel_py.state.convert import address_from_pb, authorization_from_pb
from ztunnel_py.state.model import Service, Workload
from ztunnel_py.state.store import UpdateBatch
from ztunnel_py.xds.delta import DeltaSession, Subscription

ADDRESS_TYPE = "type.googleapis.com/istio.workload.Address"
AUTHORIZATION_TYPE = "type.googleapis.com/istio.security.Authorization"


class AddressHandler:
    """``istio.workload.Address``: a workload or a service."""

    type_url = ADDRESS_TYPE

    def decode(self, name: str, payload: bytes) -> Workload | Service:
        try:
            address = workload_pb2.Address.FromString(payload)
        except pb_message.DecodeError as e:
            raise ConversionError(name, f"decode: {e}") from None
        return address_from_pb(name, address)

    def key(self, resource: Workload | Service) -> str:
        return resource.uid if isinstance(resource, Workload) else resource.key

    def updates(
        self, resources: Sequence[Workload | Service], removed: Sequence[str]
    ) -> UpdateBatch:
        return UpdateBatch(
            workloads=tuple(r for r in resources if isinstance(r, Workload)),
            services=tuple(r for r in resources if isinstance(r, Service)),
            removed_addresses=tuple(removed),
        )


class AuthorizationHandler:
    """``istio.security.Authorization``: one L4 policy."""

    type_url = AUTHORIZATION_TYPE

    def decode(self, name: str, payload: bytes) -> Authorization:
        try:
            policy = authorization_pb2.Authorization.FromString(payload)
        except pb_message.DecodeError as e:
            raise ConversionError(name, f"decode: {e}") from None
        return authorization_from_pb(name, policy)

    def key(self, resource: Authorization) -> str:
        return resource.key

    def updates(self, resources: Sequence[Authorization], removed: Sequence[str]) -> UpdateBatch:
        return UpdateBatch(policies=tuple(resources), removed_policies=tuple(removed))


def istio_session(config: Config) -> DeltaSession:
    """ztunnel's subscriptions: Address (on demand with ``XDS_ON_DEMAND``), then Authorization
    (always a wildcard)."""
    return DeltaSession(
        build_node(config),
        (
            Subscription(AddressHandler(), on_demand=config.xds_on_demand),
            Subscription(AuthorizationHandler()),
        ),
    )


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
