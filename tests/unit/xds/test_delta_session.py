"""DeltaSession: requests, ACK/NACK, versions, readiness and on-demand, driven by hand."""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

from envoy.config.core.v3.base_pb2 import Node
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import any_pb2, json_format
from google.protobuf.message import Message

from ztunnel_py.admin.dump import service_to_dict
from ztunnel_py.config import Config, from_env
from ztunnel_py.errors import ConversionError
from ztunnel_py.protos import authorization_pb2 as az
from ztunnel_py.protos import workload_pb2 as wl
from ztunnel_py.state.store import ProxyState, UpdateBatch
from ztunnel_py.xds.delta import DeltaSession, Signal, Subscription
from ztunnel_py.xds.handlers import ADDRESS_TYPE, AUTHORIZATION_TYPE, istio_session

ENV = {
    "MESH_CONFIG_PATH": "/nonexistent/mesh",
    "XDS_ADDRESS": "istiod.istio-system.svc:15012",
    "INSTANCE_IP": "10.1.0.5",
    "POD_NAME": "ztunnel-abcde",
    "POD_NAMESPACE": "istio-system",
    "NODE_NAME": "node-1",
    "ISTIO_META_CLUSTER_ID": "cluster1",
    "ISTIO_META_FOO": "bar",
    "ISTIO_METAJSON_LABELS": '{"app": "ztunnel", "n": 3}',
}


def config(**extra: str) -> Config:
    return from_env({**ENV, **extra})


def on_demand_config() -> Config:
    # ztunnel refuses on-demand xDS while its DNS proxy is on.
    return config(XDS_ON_DEMAND="true", ISTIO_META_DNS_CAPTURE="false")


def packed(msg: Message) -> any_pb2.Any:
    out = any_pb2.Any()
    out.Pack(msg)
    return out


def workload(i: int, **kw: object) -> wl.Address:
    fields: dict[str, object] = {
        "uid": f"cluster1//v1/Pod/ns1/pod-{i}",
        "name": f"pod-{i}",
        "namespace": "ns1",
        "addresses": [bytes([10, 0, 0, i])],
        "tunnel_protocol": wl.HBONE,
    }
    fields.update(kw)
    return wl.Address(workload=wl.Workload(**fields))  # type: ignore[arg-type]


def resource(
    name: str, msg: Message | None, version: str = "v1", aliases: tuple[str, ...] = ()
) -> discovery_pb2.Resource:
    res = discovery_pb2.Resource(name=name, version=version, aliases=list(aliases))
    if msg is not None:
        res.resource.CopyFrom(packed(msg))
    return res


def wl_resource(i: int, version: str = "v1", **kw: object) -> discovery_pb2.Resource:
    return resource(f"cluster1//v1/Pod/ns1/pod-{i}", workload(i, **kw), version)


def response(
    type_url: str,
    *resources: discovery_pb2.Resource,
    removed: tuple[str, ...] = (),
    nonce: str = "n1",
) -> discovery_pb2.DeltaDiscoveryResponse:
    return discovery_pb2.DeltaDiscoveryResponse(
        type_url=type_url, nonce=nonce, resources=list(resources), removed_resources=list(removed)
    )


def policy(name: str, ns: str = "ns1", **kw: object) -> az.Authorization:
    return az.Authorization(name=name, namespace=ns, scope=az.NAMESPACE, **kw)  # type: ignore[arg-type]


# --- requests -------------------------------------------------------------------------------------


def test_node_id_and_metadata_are_ztunnels() -> None:
    node = istio_session(config()).node
    assert node.id == "ztunnel~10.1.0.5~ztunnel-abcde.istio-system~istio-system.svc.cluster.local"
    meta = json_format.MessageToDict(node.metadata)
    assert meta == {
        "NAME": "ztunnel-abcde",
        "NAMESPACE": "istio-system",
        "INSTANCE_IPS": "10.1.0.5",
        "NODE_NAME": "node-1",
        "CLUSTER_ID": "cluster1",
        "FOO": "bar",
        "LABELS": {"app": "ztunnel", "n": 3.0},
    }
    assert not node.cluster


def test_node_defaults_when_downward_api_is_missing() -> None:
    cfg = from_env({"MESH_CONFIG_PATH": "/nonexistent", "XDS_ADDRESS": "localhost:15012"})
    node = istio_session(cfg).node
    assert node.id == "ztunnel~1.1.1.1~.~.svc.cluster.local"
    assert json_format.MessageToDict(node.metadata)["NODE_NAME"] == ""


def test_wildcard_initial_requests_address_then_authorization_with_node() -> None:
    session = istio_session(config())
    first, second = session.initial_requests()
    assert [first.type_url, second.type_url] == [ADDRESS_TYPE, AUTHORIZATION_TYPE]
    for req in (first, second):
        assert req.node.id.startswith("ztunnel~")
        assert list(req.resource_names_subscribe) == []
        assert list(req.resource_names_unsubscribe) == []
        assert dict(req.initial_resource_versions) == {}
        assert not req.response_nonce


def test_on_demand_initial_address_request_subscribes_to_nothing() -> None:
    session = istio_session(on_demand_config())
    address, authorization = session.initial_requests()
    assert list(address.resource_names_subscribe) == ["*"]
    assert list(address.resource_names_unsubscribe) == ["*"]
    assert list(authorization.resource_names_subscribe) == []
    assert session.waiting_for == {AUTHORIZATION_TYPE}


# --- ACK / NACK -----------------------------------------------------------------------------------


def test_ack_carries_nonce_and_applies_resources() -> None:
    session = istio_session(config())
    batch, reply = session.on_response(
        response(ADDRESS_TYPE, wl_resource(1), wl_resource(2), nonce="abc")
    )
    assert reply.type_url == ADDRESS_TYPE
    assert reply.response_nonce == "abc"
    assert not reply.HasField("error_detail")
    assert not reply.HasField("node")
    assert [w.uid for w in batch.workloads] == [
        "cluster1//v1/Pod/ns1/pod-1",
        "cluster1//v1/Pod/ns1/pod-2",
    ]
    assert session.last_outcome is not None
    assert session.last_outcome.signal is Signal.ACK
    assert dict(session.versions(ADDRESS_TYPE)) == {
        "cluster1//v1/Pod/ns1/pod-1": "v1",
        "cluster1//v1/Pod/ns1/pod-2": "v1",
    }
    state = ProxyState()
    state.apply(batch)
    assert state.workload_by_ip("", ipaddress.ip_address("10.0.0.2")) is not None


def test_partial_nack_names_only_the_failures_and_applies_the_rest() -> None:
    session = istio_session(config())
    garbage = discovery_pb2.Resource(name="garbage", version="v9")
    garbage.resource.type_url = "type.googleapis.com/istio.workload.Address"
    garbage.resource.value = b"\xff\xff\xff"
    resp = response(
        ADDRESS_TYPE,
        wl_resource(1),
        wl_resource(2, addresses=[b"\x01\x02\x03"]),
        resource("empty", None),
        garbage,
        wl_resource(3, tunnel_protocol=wl.LEGACY_ISTIO_MTLS),
        wl_resource(4),
        nonce="n7",
    )
    batch, reply = session.on_response(resp)
    assert [w.name for w in batch.workloads] == ["pod-1", "pod-4"]
    assert reply.response_nonce == "n7"
    assert reply.error_detail.code == 0
    entries = reply.error_detail.message.split("; ")
    assert (
        entries[0]
        == "cluster1//v1/Pod/ns1/pod-2: addresses[0] is 3 bytes, but an IP address is 4 or 16 bytes"
    )
    assert entries[1] == "empty: XDS payload without resource"
    assert entries[2].startswith("garbage: decode: ")
    assert (
        entries[3] == "cluster1//v1/Pod/ns1/pod-3: unsupported tunnel protocol: legacy istio mtls"
    )
    assert len(entries) == 4
    assert set(session.versions(ADDRESS_TYPE)) == {
        "cluster1//v1/Pod/ns1/pod-1",
        "cluster1//v1/Pod/ns1/pod-4",
    }
    outcome = session.last_outcome
    assert outcome is not None
    assert outcome.signal is Signal.NACK
    assert outcome.applied == 2
    assert session.dump()["types"][ADDRESS_TYPE]["lastNack"]["nonce"] == "n7"


def test_a_rejected_update_keeps_the_old_version_so_istiod_resends_it() -> None:
    session = istio_session(config())
    session.on_response(response(ADDRESS_TYPE, wl_resource(1, version="v1")))
    session.on_response(response(ADDRESS_TYPE, wl_resource(1, version="v2", status=9)))
    assert session.versions(ADDRESS_TYPE)["cluster1//v1/Pod/ns1/pod-1"] == "v1"


def test_removals_become_batch_removals_and_drop_versions() -> None:
    session = istio_session(config())
    svc = wl.Address(service=wl.Service(name="s", namespace="ns1", hostname="s.example"))
    session.on_response(response(ADDRESS_TYPE, wl_resource(1), resource("ns1/s.example", svc)))
    batch, reply = session.on_response(
        response(ADDRESS_TYPE, removed=("cluster1//v1/Pod/ns1/pod-1", "ns1/s.example"), nonce="n2")
    )
    assert batch.removed_addresses == ("cluster1//v1/Pod/ns1/pod-1", "ns1/s.example")
    assert not reply.HasField("error_detail")
    assert dict(session.versions(ADDRESS_TYPE)) == {}


def test_removal_uses_the_model_key_when_the_xds_name_differs() -> None:
    session = istio_session(config())
    session.on_response(response(AUTHORIZATION_TYPE, resource("odd-name", policy("p1"))))
    batch, _ = session.on_response(response(AUTHORIZATION_TYPE, removed=("odd-name",)))
    assert batch.removed_policies == ("ns1/p1",)


def test_authorization_batch() -> None:
    session = istio_session(config())
    batch, reply = session.on_response(
        response(AUTHORIZATION_TYPE, resource("ns1/p1", policy("p1"), version=""))
    )
    assert [p.key for p in batch.policies] == ["ns1/p1"]
    assert batch.workloads == ()
    assert not reply.HasField("error_detail")
    assert dict(session.versions(AUTHORIZATION_TYPE)) == {"ns1/p1": ""}


def test_unknown_type_is_acked_and_reported() -> None:
    session = istio_session(config())
    batch, reply = session.on_response(
        response("type.googleapis.com/istio.workload.Workload", nonce="x")
    )
    assert reply.response_nonce == "x"
    assert not reply.HasField("error_detail")
    assert batch == type(batch)()
    assert session.last_outcome is not None
    assert session.last_outcome.unknown_type
    assert not session.ready


# --- readiness ------------------------------------------------------------------------------------


def test_ready_after_an_ack_of_every_wildcard_type_and_not_after_a_nack() -> None:
    session = istio_session(config())
    steps = [
        response(ADDRESS_TYPE, wl_resource(1, status=9)),  # NACK does not count
        response(ADDRESS_TYPE, wl_resource(1)),
        response(AUTHORIZATION_TYPE),
        response(AUTHORIZATION_TYPE),
    ]
    seen = []
    for resp in steps:
        session.on_response(resp)
        assert session.last_outcome is not None
        seen.append((session.ready, session.last_outcome.became_ready, set(session.waiting_for)))
    assert seen == [
        (False, False, {ADDRESS_TYPE, AUTHORIZATION_TYPE}),
        (False, False, {AUTHORIZATION_TYPE}),
        (True, True, set()),
        (True, False, set()),
    ]


def test_on_demand_mode_is_ready_after_authorization_alone() -> None:
    session = istio_session(on_demand_config())
    session.on_response(response(AUTHORIZATION_TYPE))
    assert session.ready


# --- reconnect ------------------------------------------------------------------------------------


def test_reconnect_echoes_held_versions_per_type() -> None:
    session = istio_session(config())
    session.on_response(
        response(ADDRESS_TYPE, wl_resource(1, version="h1"), wl_resource(2, version="h2"))
    )
    session.on_response(response(AUTHORIZATION_TYPE, resource("ns1/p1", policy("p1"), version="")))
    session.on_response(response(ADDRESS_TYPE, removed=("cluster1//v1/Pod/ns1/pod-2",)))
    address, authorization = session.initial_requests()
    assert dict(address.initial_resource_versions) == {"cluster1//v1/Pod/ns1/pod-1": "h1"}
    assert dict(authorization.initial_resource_versions) == {"ns1/p1": ""}
    assert address.node.id  # reconnect requests carry the node again


# --- on demand ------------------------------------------------------------------------------------


def test_subscribe_builds_a_request_and_is_satisfied_by_an_alias() -> None:
    session = istio_session(on_demand_config())
    req = session.subscribe(ADDRESS_TYPE, "/10.0.0.1")
    assert req.type_url == ADDRESS_TYPE
    assert list(req.resource_names_subscribe) == ["/10.0.0.1"]
    assert not req.HasField("node")
    assert session.pending == {"/10.0.0.1"}
    # A reconnect before the answer re-subscribes the key with an empty version.
    assert dict(session.initial_requests()[0].initial_resource_versions) == {"/10.0.0.1": ""}

    session.on_response(response(ADDRESS_TYPE, wl_resource(9)))
    assert session.pending == {"/10.0.0.1"}  # unrelated resource
    answer = resource("cluster1//v1/Pod/ns1/pod-1", workload(1), aliases=("/10.0.0.1",))
    batch, _ = session.on_response(response(ADDRESS_TYPE, answer))
    assert session.last_outcome is not None
    assert session.last_outcome.satisfied == {"/10.0.0.1"}
    assert session.pending == frozenset()
    assert batch.workloads[0].uid == "cluster1//v1/Pod/ns1/pod-1"


def test_subscribe_is_satisfied_by_name_or_by_removal() -> None:
    session = istio_session(on_demand_config())
    session.subscribe(ADDRESS_TYPE, "cluster1//v1/Pod/ns1/pod-3")
    session.subscribe(ADDRESS_TYPE, "ns1/gone.example")
    session.on_response(response(ADDRESS_TYPE, wl_resource(3)))
    assert session.pending == {"ns1/gone.example"}
    session.on_response(response(ADDRESS_TYPE, removed=("ns1/gone.example",)))
    assert session.pending == frozenset()


def test_a_rejected_resource_still_answers_its_waiter() -> None:
    # ztunnel notifies waiters for every named resource; the caller then finds nothing.
    session = istio_session(on_demand_config())
    session.subscribe(ADDRESS_TYPE, "cluster1//v1/Pod/ns1/pod-3")
    session.on_response(response(ADDRESS_TYPE, wl_resource(3, status=9)))
    assert session.pending == frozenset()
    assert session.versions(ADDRESS_TYPE)["cluster1//v1/Pod/ns1/pod-3"] == ""


def test_forget_pending_keeps_the_subscription() -> None:
    session = istio_session(on_demand_config())
    session.subscribe(ADDRESS_TYPE, "/10.0.0.1")
    session.forget_pending("/10.0.0.1")
    assert session.pending == frozenset()
    assert "/10.0.0.1" in session.versions(ADDRESS_TYPE)


# --- CIDR VIPs and dump ---------------------------------------------------------------------------


def test_cidr_vips_are_held_on_the_service_in_the_state() -> None:
    session = istio_session(config())
    state = ProxyState()
    svc = wl.Service(
        name="s",
        namespace="ns1",
        hostname="s.example",
        addresses=[
            wl.NetworkAddress(address=bytes([10, 96, 0, 1])),
            wl.NetworkAddress(address=bytes([10, 200, 0, 0]), length=16),
        ],
    )
    batch, _ = session.on_response(
        response(ADDRESS_TYPE, resource("ns1/s.example", wl.Address(service=svc)))
    )
    state.apply(batch)
    held = state.service("ns1/s.example")
    assert held is not None
    assert [str(v) for v in held.vips] == ["/10.96.0.1"]
    assert [str(v) for v in held.cidr_vips] == ["/10.200.0.0/16"]
    assert service_to_dict(held, state)["cidrVips"] == ["/10.200.0.0/16"]  # /config_dump
    batch, _ = session.on_response(response(ADDRESS_TYPE, removed=("ns1/s.example",)))
    state.apply(batch)
    assert state.service("ns1/s.example") is None


def test_dump_shape() -> None:
    session = istio_session(config())
    session.on_response(response(ADDRESS_TYPE, wl_resource(1, version="h1")))
    dump = session.dump()
    assert dump["ready"] is False
    assert dump["types"][ADDRESS_TYPE]["resources"] == {"cluster1//v1/Pod/ns1/pod-1": "h1"}
    assert dump["types"][ADDRESS_TYPE]["acked"] is True
    assert dump["types"][AUTHORIZATION_TYPE]["lastNack"] is None
    ack = dump["types"][ADDRESS_TYPE]["lastAck"]
    assert ack == {"nonce": ack["nonce"], "applied": 1, "removed": 0} and ack["nonce"]
    assert dump["types"][AUTHORIZATION_TYPE]["lastAck"] is None


# --- the session is generic: any resource type through its handler -----------------------------

NOTE_TYPE = "type.example/test.Note"


class NoteHandler:
    """A made-up resource type whose payload is UTF-8 text; text "bad" is rejected."""

    type_url = NOTE_TYPE

    def decode(self, name: str, payload: bytes) -> str:
        if payload == b"bad":
            raise ConversionError(name, "bad note")
        return payload.decode()

    def key(self, resource: str) -> str:
        return f"note/{resource}"

    def updates(self, resources: Sequence[str], removed: Sequence[str]) -> UpdateBatch:
        # Notes travel as removals, so the test can read both lists from one batch.
        return UpdateBatch(removed_policies=(*resources, *removed))


def note(name: str, text: str) -> discovery_pb2.Resource:
    res = discovery_pb2.Resource(name=name, version="v1")
    res.resource.value = text.encode()
    return res


def test_session_runs_any_handler_with_keys_versions_and_nacks() -> None:
    session = DeltaSession(Node(id="n"), [Subscription(NoteHandler())])
    (initial,) = session.initial_requests()
    assert initial.type_url == NOTE_TYPE and initial.node.id == "n"
    batch, reply = session.on_response(response(NOTE_TYPE, note("a", "hello"), note("b", "bad")))
    assert batch.removed_policies == ("hello",)
    assert reply.error_detail.message == "b: bad note"
    assert dict(session.versions(NOTE_TYPE)) == {"a": "v1"}
    assert not session.ready  # a NACK does not count as the first response
    # Removal by xDS name reaches the handler as the key it named.
    batch, _ = session.on_response(response(NOTE_TYPE, removed=("a",)))
    assert batch.removed_policies == ("note/hello",)
    assert session.ready
