"""Our generated protobuf modules put every field on the wire where istiod expects it.

The expected numbers come from the field tables in the protocol reference (section 2 and 3),
typed out here by hand. A tiny protobuf wire codec written in this file (tag =
``number << 3 | wire_type``) checks both directions: what our code encodes, and what our code
decodes from hand-built bytes. A field with a wrong number, type or missing ``optional`` fails.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import descriptor_pb2
from google.protobuf.message import Message

from ztunnel_py.protos import authorization_pb2 as az
from ztunnel_py.protos import ca_pb2 as ca
from ztunnel_py.protos import workload_pb2 as wl
from ztunnel_py.protos import zds_pb2 as zds

REPO = Path(__file__).resolve().parents[3]

VARINT, LEN = 0, 2

# --- an independent minimal wire codec --------------------------------------------------------


def put_varint(value: int) -> bytes:
    out = bytearray()
    value &= (1 << 64) - 1
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def get_varint(data: bytes, pos: int) -> tuple[int, int]:
    shift = result = 0
    while True:
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def record(number: int, wire_type: int, payload: int | bytes) -> bytes:
    tag = put_varint(number << 3 | wire_type)
    if wire_type == VARINT:
        assert isinstance(payload, int)
        return tag + put_varint(payload)
    assert isinstance(payload, bytes)
    return tag + put_varint(len(payload)) + payload


def records(data: bytes) -> Iterator[tuple[int, int, int | bytes]]:
    pos = 0
    while pos < len(data):
        tag, pos = get_varint(data, pos)
        number, wire_type = tag >> 3, tag & 7
        if wire_type == VARINT:
            value, pos = get_varint(data, pos)
            yield number, wire_type, value
        elif wire_type == LEN:
            length, pos = get_varint(data, pos)
            yield number, wire_type, data[pos : pos + length]
            pos += length
        else:
            raise AssertionError(f"unexpected wire type {wire_type} for field {number}")


# --- the reference tables --------------------------------------------------------------------
# kind: string, bytes, uint, int64, bool, enum, message, optional_uint (presence), and the
# repeated forms rep_string, rep_bytes, rep_message, packed_uint, packed_enum, map_message.

FIELDS: list[tuple[type[Message], str, int, str]] = [
    (wl.Address, "workload", 1, "message"),
    (wl.Address, "service", 2, "message"),
    (wl.Service, "name", 1, "string"),
    (wl.Service, "namespace", 2, "string"),
    (wl.Service, "hostname", 3, "string"),
    (wl.Service, "addresses", 4, "rep_message"),
    (wl.Service, "ports", 5, "rep_message"),
    (wl.Service, "subject_alt_names", 6, "rep_string"),
    (wl.Service, "waypoint", 7, "message"),
    (wl.Service, "load_balancing", 8, "message"),
    (wl.Service, "ip_families", 9, "enum"),
    (wl.Service, "extensions", 10, "rep_message"),
    (wl.Service, "canonical", 11, "bool"),
    (wl.Service, "ingress_use_waypoint", 12, "bool"),
    (wl.Service, "weighted_waypoints", 13, "rep_message"),
    (wl.Service, "visibility", 14, "enum"),
    (wl.LoadBalancing, "routing_preference", 1, "packed_enum"),
    (wl.LoadBalancing, "mode", 2, "enum"),
    (wl.LoadBalancing, "health_policy", 3, "enum"),
    (wl.Workload, "uid", 20, "string"),
    (wl.Workload, "name", 1, "string"),
    (wl.Workload, "namespace", 2, "string"),
    (wl.Workload, "addresses", 3, "rep_bytes"),
    (wl.Workload, "hostname", 21, "string"),
    (wl.Workload, "network", 4, "string"),
    (wl.Workload, "tunnel_protocol", 5, "enum"),
    (wl.Workload, "trust_domain", 6, "string"),
    (wl.Workload, "service_account", 7, "string"),
    (wl.Workload, "waypoint", 8, "message"),
    (wl.Workload, "network_gateway", 19, "message"),
    (wl.Workload, "node", 9, "string"),
    (wl.Workload, "canonical_name", 10, "string"),
    (wl.Workload, "canonical_revision", 11, "string"),
    (wl.Workload, "workload_type", 12, "enum"),
    (wl.Workload, "workload_name", 13, "string"),
    (wl.Workload, "native_tunnel", 14, "bool"),
    (wl.Workload, "application_tunnel", 23, "message"),
    (wl.Workload, "services", 22, "map_message"),
    (wl.Workload, "authorization_policies", 16, "rep_string"),
    (wl.Workload, "status", 17, "enum"),
    (wl.Workload, "cluster_id", 18, "string"),
    (wl.Workload, "locality", 24, "message"),
    (wl.Workload, "network_mode", 25, "enum"),
    (wl.Workload, "extensions", 26, "rep_message"),
    (wl.Workload, "capacity", 27, "message"),
    (wl.Locality, "region", 1, "string"),
    (wl.Locality, "zone", 2, "string"),
    (wl.Locality, "subzone", 3, "string"),
    (wl.PortList, "ports", 1, "rep_message"),
    (wl.Port, "service_port", 1, "uint"),
    (wl.Port, "target_port", 2, "uint"),
    (wl.Port, "app_protocol", 3, "enum"),
    (wl.ApplicationTunnel, "protocol", 1, "enum"),
    (wl.ApplicationTunnel, "port", 2, "uint"),
    (wl.GatewayAddress, "hostname", 1, "message"),
    (wl.GatewayAddress, "address", 2, "message"),
    (wl.GatewayAddress, "hbone_mtls_port", 3, "uint"),
    (wl.WeightedWaypoint, "destination", 1, "message"),
    (wl.WeightedWaypoint, "weight", 2, "uint"),
    (wl.NetworkAddress, "network", 1, "string"),
    (wl.NetworkAddress, "address", 2, "bytes"),
    (wl.NetworkAddress, "length", 3, "optional_uint"),
    (wl.NamespacedHostname, "namespace", 1, "string"),
    (wl.NamespacedHostname, "hostname", 2, "string"),
    (wl.Extension, "name", 1, "string"),
    (wl.Extension, "config", 2, "message"),
    (az.Authorization, "name", 1, "string"),
    (az.Authorization, "namespace", 2, "string"),
    (az.Authorization, "scope", 3, "enum"),
    (az.Authorization, "action", 4, "enum"),
    (az.Authorization, "rules", 5, "rep_message"),
    (az.Authorization, "dry_run", 6, "bool"),
    (az.Authorization, "extensions", 7, "rep_message"),
    (az.Rule, "clauses", 1, "rep_message"),
    (az.Clause, "matches", 2, "rep_message"),
    (az.Match, "namespaces", 1, "rep_message"),
    (az.Match, "not_namespaces", 2, "rep_message"),
    (az.Match, "service_accounts", 11, "rep_message"),
    (az.Match, "not_service_accounts", 12, "rep_message"),
    (az.Match, "principals", 3, "rep_message"),
    (az.Match, "not_principals", 4, "rep_message"),
    (az.Match, "source_ips", 5, "rep_message"),
    (az.Match, "not_source_ips", 6, "rep_message"),
    (az.Match, "destination_ips", 7, "rep_message"),
    (az.Match, "not_destination_ips", 8, "rep_message"),
    (az.Match, "destination_ports", 9, "packed_uint"),
    (az.Match, "not_destination_ports", 10, "packed_uint"),
    (az.Match, "extensions", 13, "rep_message"),
    (az.Address, "address", 1, "bytes"),
    (az.Address, "length", 2, "uint"),
    (az.ServiceAccountMatch, "namespace", 1, "string"),
    (az.ServiceAccountMatch, "serviceAccount", 2, "string"),
    (az.StringMatch, "exact", 1, "string"),
    (az.StringMatch, "prefix", 2, "string"),
    (az.StringMatch, "suffix", 3, "string"),
    (az.StringMatch, "presence", 4, "message"),
    (zds.ZdsHello, "version", 1, "enum"),
    (zds.WorkloadInfo, "name", 1, "string"),
    (zds.WorkloadInfo, "namespace", 2, "string"),
    (zds.WorkloadInfo, "service_account", 3, "string"),
    (zds.AddWorkload, "uid", 1, "string"),
    (zds.AddWorkload, "workload_info", 2, "message"),
    (zds.KeepWorkload, "uid", 1, "string"),
    (zds.DelWorkload, "uid", 2, "string"),
    (zds.Ack, "error", 1, "string"),
    (zds.WorkloadRequest, "add", 1, "message"),
    (zds.WorkloadRequest, "del", 2, "message"),
    (zds.WorkloadRequest, "snapshot_sent", 3, "message"),
    (zds.WorkloadRequest, "keep", 5, "message"),
    (zds.WorkloadResponse, "ack", 1, "message"),
    (ca.IstioCertificateRequest, "csr", 1, "string"),
    (ca.IstioCertificateRequest, "validity_duration", 3, "int64"),
    (ca.IstioCertificateRequest, "metadata", 4, "message"),
    (ca.IstioCertificateResponse, "cert_chain", 1, "rep_string"),
]

# Messages with no fields at all (nothing to put on the wire, but they must exist).
EMPTY_MESSAGES: list[type[Message]] = [zds.SnapshotSent]

ONEOFS: list[tuple[type[Message], str, set[str]]] = [
    (wl.Address, "type", {"workload", "service"}),
    (wl.GatewayAddress, "destination", {"hostname", "address"}),
    (az.StringMatch, "match_type", {"exact", "prefix", "suffix", "presence"}),
    (zds.WorkloadRequest, "payload", {"add", "del", "snapshot_sent", "keep"}),
    (zds.WorkloadResponse, "payload", {"ack"}),
]

ENUMS: list[tuple[Any, dict[str, int]]] = [
    (wl.IPFamilies, {"AUTOMATIC": 0, "IPV4_ONLY": 1, "IPV6_ONLY": 2, "DUAL": 3}),
    (wl.NetworkMode, {"STANDARD": 0, "HOST_NETWORK": 1}),
    (wl.WorkloadStatus, {"HEALTHY": 0, "UNHEALTHY": 1}),
    (wl.WorkloadType, {"DEPLOYMENT": 0, "CRONJOB": 1, "POD": 2, "JOB": 3}),
    (wl.AppProtocol, {"UNKNOWN": 0, "HTTP11": 1, "HTTP2": 2, "GRPC": 3, "TCP": 4, "TLS": 5}),
    (wl.TunnelProtocol, {"NONE": 0, "HBONE": 1, "LEGACY_ISTIO_MTLS": 2}),
    (wl.Service.Visibility, {"PUBLIC": 0, "NAMESPACE": 1}),
    (
        wl.LoadBalancing.Scope,
        {
            "UNSPECIFIED_SCOPE": 0,
            "REGION": 1,
            "ZONE": 2,
            "SUBZONE": 3,
            "NODE": 4,
            "CLUSTER": 5,
            "NETWORK": 6,
        },
    ),
    (
        wl.LoadBalancing.Mode,
        {"UNSPECIFIED_MODE": 0, "STRICT": 1, "FAILOVER": 2, "PASSTHROUGH": 3},
    ),
    (wl.LoadBalancing.HealthPolicy, {"ONLY_HEALTHY": 0, "ALLOW_ALL": 1}),
    (wl.ApplicationTunnel.Protocol, {"NONE": 0, "PROXY": 1}),
    (az.Scope, {"GLOBAL": 0, "NAMESPACE": 1, "WORKLOAD_SELECTOR": 2}),
    (az.Action, {"ALLOW": 0, "DENY": 1}),
    (zds.Version, {"NOT_USED": 0, "V1": 1}),
]

RESERVED: list[tuple[Any, str, int]] = [
    (wl, "Workload", 15),
    (wl, "GatewayAddress", 4),
    (zds, "WorkloadInfo", 4),
]

PACKAGES = {
    wl: "istio.workload",
    az: "istio.security",
    zds: "istio.workload.zds",
    ca: "istio.v1.auth",
}

SAMPLE_STRING = "ns1/host.example"
SAMPLE_BYTES = b"\x0a\x00\x00\x07"
SAMPLE_INT = 1  # valid for every enum (each has a value 1), for bool and for integers


def _field_id(entry: tuple[type[Message], str, int, str]) -> str:
    cls, name, number, _ = entry
    return f"{cls.DESCRIPTOR.full_name}.{name}={number}"


def _set(msg: Message, name: str, kind: str) -> None:
    if kind in {"string"}:
        setattr(msg, name, SAMPLE_STRING)
    elif kind == "bytes":
        setattr(msg, name, SAMPLE_BYTES)
    elif kind in {"uint", "int64", "enum", "optional_uint"}:
        setattr(msg, name, 0 if kind == "optional_uint" else SAMPLE_INT)
    elif kind == "bool":
        setattr(msg, name, True)
    elif kind == "message":
        getattr(msg, name).SetInParent()
    elif kind == "rep_string":
        getattr(msg, name).append(SAMPLE_STRING)
    elif kind == "rep_bytes":
        getattr(msg, name).append(SAMPLE_BYTES)
    elif kind == "rep_message":
        getattr(msg, name).add()
    elif kind in {"packed_uint", "packed_enum"}:
        getattr(msg, name).append(SAMPLE_INT)
    elif kind == "map_message":
        getattr(msg, name)[SAMPLE_STRING].SetInParent()
    else:
        raise AssertionError(kind)


def _expected_record(number: int, kind: str) -> tuple[int, int, int | bytes]:
    if kind in {"string", "rep_string"}:
        return number, LEN, SAMPLE_STRING.encode()
    if kind in {"bytes", "rep_bytes"}:
        return number, LEN, SAMPLE_BYTES
    if kind in {"uint", "int64", "enum", "bool"}:
        return number, VARINT, SAMPLE_INT
    if kind == "optional_uint":
        return number, VARINT, 0  # explicit presence: a zero is still written
    if kind in {"message", "rep_message"}:
        return number, LEN, b""
    if kind in {"packed_uint", "packed_enum"}:
        return number, LEN, put_varint(SAMPLE_INT)
    if kind == "map_message":
        # A map entry is a message {key = 1; value = 2}.
        entry = record(1, LEN, SAMPLE_STRING.encode()) + record(2, LEN, b"")
        return number, LEN, entry
    raise AssertionError(kind)


@pytest.mark.parametrize("entry", FIELDS, ids=_field_id)
def test_our_encoding_uses_the_reference_number(entry: tuple[type[Message], str, int, str]) -> None:
    cls, name, number, kind = entry
    msg = cls()
    _set(msg, name, kind)
    assert list(records(msg.SerializeToString())) == [_expected_record(number, kind)]


@pytest.mark.parametrize("entry", FIELDS, ids=_field_id)
def test_hand_encoded_field_decodes_into_the_named_field(
    entry: tuple[type[Message], str, int, str],
) -> None:
    cls, name, number, kind = entry
    number, wire_type, payload = _expected_record(number, kind)
    msg = cls.FromString(record(number, wire_type, payload))
    value = getattr(msg, name)
    if kind == "string":
        assert value == SAMPLE_STRING
    elif kind == "bytes":
        assert value == SAMPLE_BYTES
    elif kind in {"uint", "int64", "enum"}:
        assert value == SAMPLE_INT
    elif kind == "bool":
        assert value is True
    elif kind in {"message", "optional_uint"}:
        assert msg.HasField(name)
    elif kind == "rep_string":
        assert list(value) == [SAMPLE_STRING]
    elif kind == "rep_bytes":
        assert list(value) == [SAMPLE_BYTES]
    elif kind in {"rep_message", "packed_uint", "packed_enum"}:
        assert len(value) == 1
    elif kind == "map_message":
        assert list(value) == [SAMPLE_STRING]
    else:
        raise AssertionError(kind)


def test_repeated_scalars_also_decode_unpacked() -> None:
    # Older encoders may send repeated varints one record each; proto3 parsers must accept it.
    data = record(9, VARINT, 80) + record(9, VARINT, 443)
    assert list(az.Match.FromString(data).destination_ports) == [80, 443]


def test_absent_network_address_length_means_host() -> None:
    addr = wl.NetworkAddress.FromString(record(2, LEN, SAMPLE_BYTES))
    assert not addr.HasField("length")


def _all_messages(module: Any) -> Iterator[Any]:
    def walk(desc: Any) -> Iterator[Any]:
        yield desc
        for nested in desc.nested_types:
            if not desc.GetOptions().map_entry and not nested.GetOptions().map_entry:
                yield from walk(nested)

    for desc in module.DESCRIPTOR.message_types_by_name.values():
        yield from walk(desc)


@pytest.mark.parametrize("module", list(PACKAGES), ids=lambda m: m.__name__.rsplit(".", 1)[-1])
def test_tables_cover_every_field_of_every_message(module: Any) -> None:
    listed: dict[str, set[str]] = {}
    for cls, name, _, _ in FIELDS:
        listed.setdefault(cls.DESCRIPTOR.full_name, set()).add(name)
    for cls in EMPTY_MESSAGES:
        listed.setdefault(cls.DESCRIPTOR.full_name, set())
    for desc in _all_messages(module):
        assert desc.full_name in listed, f"{desc.full_name} is not in the reference table"
        assert set(desc.fields_by_name) == listed[desc.full_name], desc.full_name


@pytest.mark.parametrize("module", list(PACKAGES), ids=lambda m: m.__name__.rsplit(".", 1)[-1])
def test_packages_match_upstream(module: Any) -> None:
    assert module.DESCRIPTOR.package == PACKAGES[module]


def test_type_urls_of_the_xds_resources() -> None:
    assert wl.Address.DESCRIPTOR.full_name == "istio.workload.Address"
    assert az.Authorization.DESCRIPTOR.full_name == "istio.security.Authorization"


@pytest.mark.parametrize(
    ("cls", "oneof", "members"), ONEOFS, ids=lambda v: getattr(v, "__name__", "")
)
def test_oneofs(cls: type[Message], oneof: str, members: set[str]) -> None:
    desc = cls.DESCRIPTOR.oneofs_by_name[oneof]
    assert {f.name for f in desc.fields} == members
    msg = cls()
    first, second = sorted(members)[:2] if len(members) > 1 else (next(iter(members)),) * 2
    getattr(msg, first).SetInParent() if _is_message(cls, first) else setattr(msg, first, "a")
    getattr(msg, second).SetInParent() if _is_message(cls, second) else setattr(msg, second, "b")
    assert msg.WhichOneof(oneof) == second


def _is_message(cls: type[Message], name: str) -> bool:
    return cls.DESCRIPTOR.fields_by_name[name].message_type is not None


@pytest.mark.parametrize(
    ("enum", "values"),
    ENUMS,
    ids=lambda v: getattr(v, "DESCRIPTOR", None) and v.DESCRIPTOR.full_name,
)
def test_enum_values(enum: Any, values: dict[str, int]) -> None:
    assert {v.name: v.number for v in enum.DESCRIPTOR.values} == values


@pytest.mark.parametrize(
    ("module", "message", "number"),
    RESERVED,
    ids=lambda v: str(v) if isinstance(v, (str, int)) else "",
)
def test_reserved_numbers(module: Any, message: str, number: int) -> None:
    proto = descriptor_pb2.FileDescriptorProto.FromString(module.DESCRIPTOR.serialized_pb)
    (msg,) = [m for m in proto.message_type if m.name == message]
    assert any(r.start <= number < r.end for r in msg.reserved_range)


def test_ca_service_method() -> None:
    service = ca.DESCRIPTOR.services_by_name["IstioCertificateService"]
    method = service.methods_by_name["CreateCertificate"]
    assert service.full_name == "istio.v1.auth.IstioCertificateService"
    assert method.input_type.full_name == "istio.v1.auth.IstioCertificateRequest"
    assert method.output_type.full_name == "istio.v1.auth.IstioCertificateResponse"


def test_full_workload_round_trips_through_the_wire_reader() -> None:
    w = wl.Workload(
        uid="Kubernetes//Pod/ns1/pod-a",
        name="pod-a",
        namespace="ns1",
        addresses=[bytes([10, 0, 0, 7]), bytes(16)],
        tunnel_protocol=wl.HBONE,
        services={
            "ns1/svc.ns1.svc.cluster.local": wl.PortList(
                ports=[wl.Port(service_port=80, target_port=8080)]
            )
        },
    )
    w.capacity.value = 3
    seen = [(n, t) for n, t, _ in records(w.SerializeToString())]
    assert seen == [
        (1, LEN),
        (2, LEN),
        (3, LEN),
        (3, LEN),
        (5, VARINT),
        (20, LEN),
        (22, LEN),
        (27, LEN),
    ]
    capacity = dict((n, v) for n, _, v in records(w.SerializeToString()))[27]
    assert isinstance(capacity, bytes)
    assert list(records(capacity)) == [(1, VARINT, 3)]


# --- generated output is up to date -----------------------------------------------------------


def test_committed_generated_modules_are_current() -> None:
    done = subprocess.run(
        [sys.executable, "tools/gen_protos.py", "--check"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr


def test_check_names_a_stale_file(tmp_path: Path) -> None:
    (tmp_path / "tools").mkdir()
    shutil.copy(REPO / "tools/gen_protos.py", tmp_path / "tools/gen_protos.py")
    shutil.copytree(REPO / "xds", tmp_path / "xds")
    shutil.copytree(REPO / "ztunnel_py/protos", tmp_path / "ztunnel_py/protos")
    stale = tmp_path / "ztunnel_py/protos/zds_pb2.py"
    stale.write_text(stale.read_text() + "\n# edited by hand\n")
    done = subprocess.run(
        [sys.executable, "tools/gen_protos.py", "--check"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert done.returncode == 1
    assert "stale: ztunnel_py/protos/zds_pb2.py" in done.stderr
