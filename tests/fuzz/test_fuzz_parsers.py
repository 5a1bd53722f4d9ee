"""Fuzzers for every parser a peer or an operator feeds (see ``ztunnel_py.testing.fuzz`` for
the CI budget and the long-run command)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import string

import h11
import yaml
from google.protobuf.message import DecodeError
from hypothesis import given
from hypothesis import strategies as st

from ztunnel_py.admin.http import HttpServer, Request, _Refused
from ztunnel_py.errors import MAX_ERROR_CHARS, ConversionError, LocalConfigError
from ztunnel_py.hbone.connection import HboneConnection, Role
from ztunnel_py.hbone.errors import HboneError
from ztunnel_py.hbone.events import ConnectionTerminated
from ztunnel_py.hbone.headers import (
    parse_authority,
    parse_baggage,
    parse_connect_request,
    parse_forwarded,
    parse_traceparent,
)
from ztunnel_py.protos import authorization_pb2 as az
from ztunnel_py.protos import workload_pb2 as wl
from ztunnel_py.redirect.zds_protocol import ZdsError, decode_ack, decode_hello, decode_request
from ztunnel_py.state.convert import address_from_pb, authorization_from_pb
from ztunnel_py.testing.fuzz import fuzz_settings
from ztunnel_py.xds.local import parse_local_config

# ------------------------------------------------------------------ xDS resources

SEED_ADDRESS = wl.Address(
    workload=wl.Workload(
        uid="cluster1//v1/Pod/default/a",
        name="a",
        namespace="default",
        addresses=[bytes([10, 0, 0, 1])],
        service_account="sa",
        services={
            "default/echo.default.svc.cluster.local": wl.PortList(
                ports=[wl.Port(service_port=80, target_port=8080)]
            )
        },
    )
).SerializeToString()
SEED_SERVICE = wl.Address(
    service=wl.Service(
        name="echo",
        namespace="default",
        hostname="echo.default.svc.cluster.local",
        addresses=[wl.NetworkAddress(address=bytes([10, 96, 0, 1]))],
        ports=[wl.Port(service_port=80, target_port=8080)],
    )
).SerializeToString()
SEED_POLICY = az.Authorization(
    name="p",
    namespace="default",
    scope=az.Scope.NAMESPACE,
    action=az.Action.DENY,
    rules=[az.Rule(clauses=[az.Clause(matches=[az.Match(destination_ports=[8080])])])],
).SerializeToString()


def mutated(seed: bytes) -> st.SearchStrategy[bytes]:
    """``seed`` with a few bytes overwritten, inserted or cut: mostly still a message."""

    @st.composite
    def build(draw: st.DrawFn) -> bytes:
        data = bytearray(seed)
        for _ in range(draw(st.integers(1, 8))):
            op = draw(st.sampled_from(["set", "insert", "cut"]))
            pos = draw(st.integers(0, max(len(data) - 1, 0)))
            if op == "set" and data:
                data[pos] = draw(st.integers(0, 255))
            elif op == "insert":
                data[pos:pos] = draw(st.binary(max_size=8))
            else:
                del data[pos : pos + draw(st.integers(1, 8))]
        return bytes(data)

    return build()


@fuzz_settings
@given(st.one_of(st.binary(max_size=512), mutated(SEED_ADDRESS), mutated(SEED_SERVICE)))
def test_xds_address_conversion_only_refuses(raw: bytes) -> None:
    msg = wl.Address()
    try:
        msg.ParseFromString(raw)
    except DecodeError:
        return  # grpc would have failed the response before conversion
    try:
        address_from_pb("fuzzed", msg)
    except ConversionError as e:
        assert e.resource_name == "fuzzed"


@fuzz_settings
@given(st.one_of(st.binary(max_size=512), mutated(SEED_POLICY)))
def test_xds_authorization_conversion_only_refuses(raw: bytes) -> None:
    msg = az.Authorization()
    try:
        msg.ParseFromString(raw)
    except DecodeError:
        return
    try:
        authorization_from_pb("fuzzed", msg)
    except ConversionError as e:
        assert e.resource_name == "fuzzed"


# ------------------------------------------------------------------ local config

KEYS = ["workloads", "services", "policies", "uid", "name", "namespace", "workloadIps",
        "protocol", "hostname", "vips", "ports", "rules", "action", "scope", "sourceIps",
        "destinationPorts", "services", "waypoint", "x"]  # fmt: skip
yaml_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats(allow_nan=False)
    | st.text(max_size=20) | st.sampled_from(["10.0.0.1", "HBONE", "DENY", "fd00::1", "80"]),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=8), children, max_size=4),
    max_leaves=30,
)  # fmt: skip


@fuzz_settings
@given(st.one_of(yaml_values.map(lambda v: yaml.safe_dump(v)), st.text(max_size=300)))
def test_local_config_only_refuses(text: str) -> None:
    try:
        parse_local_config(text)
    except LocalConfigError as e:
        assert len(str(e)) <= MAX_ERROR_CHARS + 400


@fuzz_settings
@given(st.binary(max_size=300))
def test_local_config_file_bytes_only_refuse(data: bytes) -> None:
    import tempfile
    from pathlib import Path

    from ztunnel_py.xds.local import load_local_config_file

    with tempfile.NamedTemporaryFile(suffix=".yaml") as f:
        f.write(data)
        f.flush()
        with contextlib.suppress(LocalConfigError):
            load_local_config_file(Path(f.name))


# ------------------------------------------------------------------ ZDS (istio-cni agent)


@fuzz_settings
@given(st.binary(max_size=256), st.integers(0, 2), st.sampled_from([0, 0x20, 0x08]))
def test_zds_requests_only_refuse(data: bytes, nfds: int, flags: int) -> None:
    fds = [os.open(os.devnull, os.O_RDONLY) for _ in range(nfds)]
    try:
        with contextlib.suppress(ZdsError):
            decode_request(data, fds, flags)
    finally:
        for fd in fds:
            os.close(fd)


@fuzz_settings
@given(st.binary(max_size=128))
def test_zds_replies_only_refuse(data: bytes) -> None:
    for decode in (decode_hello, decode_ack):
        with contextlib.suppress(ZdsError):
            decode(data)


# ------------------------------------------------------------------ HBONE

header_text = st.text(alphabet=string.printable + "\x00é[]:%", max_size=60)


@fuzz_settings
@given(
    st.sampled_from(["CONNECT", "GET", "connect", ""]) | header_text,
    header_text,
    st.lists(
        st.tuples(
            st.sampled_from(["forwarded", "baggage", "traceparent", ":path", ":scheme", "x"]),
            header_text,
        ),
        max_size=4,
    ),
)
def test_hbone_request_headers_only_refuse(
    method: str, authority: str, headers: list[tuple[str, str]]
) -> None:
    with contextlib.suppress(HboneError):
        parse_connect_request(method, authority, tuple(headers))
    for parse in (parse_authority, parse_forwarded, parse_baggage, parse_traceparent):
        with contextlib.suppress(HboneError):
            parse(authority)


PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


@fuzz_settings
@given(st.lists(st.binary(max_size=64), max_size=8))
def test_hbone_server_survives_any_bytes_after_the_preface(chunks: list[bytes]) -> None:
    server = HboneConnection(Role.SERVER)
    events = server.receive_data(PREFACE + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")
    for chunk in chunks:
        events += server.receive_data(chunk)
        server.data_to_send()
    terminated = [e for e in events if isinstance(e, ConnectionTerminated)]
    assert len(terminated) <= 1


# ------------------------------------------------------------------ admin HTTP


@fuzz_settings
@given(
    st.one_of(
        st.binary(max_size=300),
        st.builds(
            lambda method, path, extra: f"{method} {path} HTTP/1.1\r\n{extra}\r\n\r\n".encode(),
            st.sampled_from(["GET", "POST", "PUT", "get", ""]),
            st.text(max_size=30),
            st.text(max_size=60),
        ),
    )
)
def test_admin_requests_only_refuse(data: bytes) -> None:
    async def read() -> Request | None:
        reader = asyncio.StreamReader(limit=64 * 1024)
        reader.feed_data(data)
        reader.feed_eof()
        server = HttpServer("fuzz", {})
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=server.limits.max_header_bytes)
        return await server._read_request(conn, reader)

    try:
        request = asyncio.run(read())
    except (_Refused, ConnectionResetError):  # an HTTP error, or the client went away
        return
    assert request is None or isinstance(request, Request)
