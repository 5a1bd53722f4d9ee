"""HBONE header formats: build, parse, round-trip, and clear refusals of malformed values."""

from __future__ import annotations

import dataclasses
import ipaddress
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ztunnel_py.hbone.errors import BadConnectRequest, InvalidAuthority, InvalidHeader
from ztunnel_py.hbone.headers import (
    Authority,
    Baggage,
    Forwarded,
    TraceParent,
    format_authority,
    format_baggage,
    new_traceparent,
    parse_authority,
    parse_baggage,
    parse_connect_request,
    parse_forwarded,
    parse_traceparent,
    request_headers,
    response_headers,
)

ipv4 = st.builds(ipaddress.IPv4Address, st.integers(0, 2**32 - 1))
ipv6 = st.builds(ipaddress.IPv6Address, st.integers(0, 2**128 - 1))
ips = ipv4 | ipv6
ports = st.integers(1, 65535)
label = st.from_regex(r"\A[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?\Z")
hostnames = (
    st.lists(label, min_size=1, max_size=5)
    .map(".".join)
    .filter(lambda h: not h.replace(".", "").isdigit())
)
token_value = st.from_regex(r"\A[A-Za-z0-9._-]{1,20}\Z")


@given(ips, ports)
def test_ip_authority_round_trip(
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address, port: int
) -> None:
    text = format_authority(ip, port)
    assert parse_authority(text) == Authority(ip, port)
    assert ("[" in text) == (ip.version == 6)


@given(hostnames, ports)
def test_hostname_authority_round_trip(host: str, port: int) -> None:
    parsed = parse_authority(f"{host}:{port}")
    assert parsed == Authority(host, port) and parsed.ip is None
    assert str(parsed) == f"{host}:{port}"


def test_authority_examples() -> None:
    assert parse_authority("10.0.0.1:80") == Authority(ipaddress.ip_address("10.0.0.1"), 80)
    assert parse_authority("[fd00::1]:15008").host == ipaddress.ip_address("fd00::1")
    assert (
        parse_authority("Echo.Default.svc.cluster.local:80").host
        == "echo.default.svc.cluster.local"
    )


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("", "empty"),
        ("10.0.0.1", "missing port"),
        (":80", "missing port"),
        ("10.0.0.1:", "not a number"),
        ("10.0.0.1:http", "not a number"),
        ("10.0.0.1:0", "outside"),
        ("10.0.0.1:65536", "outside"),
        ("10.0.0.1:123456", "not a number"),
        ("fd00::1:80", "brackets"),
        ("[fd00::1]80", "[<ipv6>]:<port>"),
        ("[fd00::1:80", "[<ipv6>]:<port>"),
        ("[10.0.0.1]:80", "not an IPv6"),
        ("300.1.1.1:80", "not a valid IPv4"),
        ("bad_host!:80", "not a valid hostname"),
        ("-lead.example:80", "not a valid hostname"),
        ("a..b:80", "not a valid hostname"),
    ],
)
def test_malformed_authority_is_refused_with_the_reason(value: str, reason: str) -> None:
    with pytest.raises(InvalidAuthority) as e:
        parse_authority(value)
    assert reason in str(e.value) and e.value.value == value


@given(ips, ports, st.none() | hostnames)
def test_forwarded_round_trip(
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address, port: int, host: str | None
) -> None:
    value = str(Forwarded(ip, port, host))
    assert parse_forwarded(value) == Forwarded(ip, port, host)


def test_forwarded_matches_ztunnel_format() -> None:
    v4 = ipaddress.ip_address("127.0.0.1")
    v6 = ipaddress.ip_address("::1")
    assert str(Forwarded(v4, 80)) == 'for="127.0.0.1:80"'
    assert str(Forwarded(v6, 80)) == 'for="[::1]:80"'
    assert (
        str(Forwarded(v4, 80, "svc.ns.svc.cluster.local"))
        == 'for="127.0.0.1:80";host=svc.ns.svc.cluster.local'
    )
    # Other proxies may add elements and parameters; only the first for= counts.
    assert parse_forwarded('for="1.2.3.4:5";proto=https, for="9.9.9.9:1"').for_port == 5


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("host=a.b", "missing for"),
        ("for", "not key=value"),
        ('for="1.2.3.4:5', "unterminated"),
        ('for="1.2.3.4:5";for="1.2.3.4:6"', "twice"),
        ('for="1.2.3.4"', "for= missing port"),
        ('for="example.com:80"', "must be an IP"),
        ('for="1.2.3.4:5";host=bad!host', "not a valid hostname"),
    ],
)
def test_malformed_forwarded(value: str, reason: str) -> None:
    with pytest.raises(InvalidHeader) as e:
        parse_forwarded(value)
    assert reason in str(e.value) and e.value.name == "forwarded"


baggages = st.builds(
    Baggage,
    cluster_id=st.none() | token_value,
    namespace=st.none() | token_value,
    workload_type=st.sampled_from(["deployment", "cronjob", "pod", "job"]),
    workload_name=st.none() | token_value,
    service_name=st.none() | token_value,
    revision=st.none() | token_value,
    region=st.none() | token_value,
    zone=st.none() | token_value,
)


@given(baggages)
def test_baggage_round_trip(b: Baggage) -> None:
    parsed = parse_baggage(format_baggage(b))
    if b.workload_name is None:
        # Without a workload name the header carries no k8s.<type>.name key to tell the type.
        parsed = dataclasses.replace(parsed, workload_type=b.workload_type)
    assert parsed == b


def test_baggage_matches_ztunnel_format() -> None:
    b = Baggage(
        cluster_id="K1", namespace="NS1", workload_name="N1", service_name="N2", revision="V1"
    )
    assert str(b) == (
        "k8s.cluster.name=K1,k8s.namespace.name=NS1,k8s.deployment.name=N1,"
        "service.name=N2,service.version=V1"
    )
    parsed = parse_baggage("k8s.job.name=J, other=ignored;prop=1, cloud.region=r1")
    assert (parsed.workload_type, parsed.workload_name, parsed.region) == ("job", "J", "r1")
    assert parse_baggage("") == Baggage()
    assert (
        format_baggage(Baggage(workload_type="weird", workload_name="w")) == "k8s.deployment.name=w"
    )


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("k8s.cluster.name", "not key=value"),
        ("bad key=v", "not an HTTP token"),
        ('a=b"c', "forbids"),
    ],
)
def test_malformed_baggage(value: str, reason: str) -> None:
    with pytest.raises(InvalidHeader) as e:
        parse_baggage(value)
    assert reason in str(e.value)


@given(st.integers(0, 2**64))
def test_traceparent_is_w3c_and_round_trips(seed: int) -> None:
    tp = new_traceparent(random.Random(seed))
    text = str(tp)
    assert len(text) == 55 and text.startswith("00-") and text.endswith("-00")
    assert parse_traceparent(text) == tp


def test_traceparent_comes_from_the_injected_rng() -> None:
    assert new_traceparent(random.Random(7)) == new_traceparent(random.Random(7))
    assert new_traceparent(random.Random(7)) != new_traceparent(random.Random(8))


class _ZeroRng(random.Random):
    def getrandbits(self, k: int, /) -> int:
        return 0


def test_traceparent_never_all_zero() -> None:
    tp = new_traceparent(_ZeroRng())
    assert tp.trace_id and tp.span_id


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("00-abc-def-00", "expected"),
        ("00-" + "A" * 32 + "-" + "1" * 16 + "-00", "lower-case"),
        ("ff-" + "1" * 32 + "-" + "1" * 16 + "-00", "version ff"),
        ("00-" + "0" * 32 + "-" + "1" * 16 + "-00", "all zeros"),
        ("00-" + "1" * 32 + "-" + "0" * 16 + "-00", "all zeros"),
    ],
)
def test_malformed_traceparent(value: str, reason: str) -> None:
    with pytest.raises(InvalidHeader) as e:
        parse_traceparent(value)
    assert reason in str(e.value)


def test_connect_request_round_trip() -> None:
    fwd = Forwarded(ipaddress.ip_address("10.0.0.1"), 4000, "echo.ns.svc.cluster.local")
    bag = Baggage(namespace="ns", workload_name="client")
    tp = TraceParent(1, 2)
    headers = request_headers(forwarded=fwd, baggage=bag, traceparent=tp, forwarded_network="net1")
    full = (("method_ignored", "x"), *headers)
    req = parse_connect_request("CONNECT", "10.0.0.2:80", tuple(full))
    assert req.authority == parse_authority("10.0.0.2:80")
    assert (req.forwarded, req.baggage, req.traceparent, req.forwarded_network) == (
        fwd,
        bag,
        tp,
        "net1",
    )
    bare = parse_connect_request("CONNECT", "10.0.0.2:80", ())
    assert (bare.forwarded, bare.baggage, bare.traceparent) == (None, None, None)
    assert request_headers(baggage=Baggage()) == []
    assert response_headers(baggage=bag) == [
        ("baggage", "k8s.namespace.name=ns,k8s.deployment.name=client")
    ]
    assert response_headers() == []


@pytest.mark.parametrize(
    ("method", "headers", "reason"),
    [
        ("GET", (), "not CONNECT"),
        ("CONNECT", ((":path", "/"),), "extended CONNECT"),
        ("CONNECT", ((":protocol", "websocket"),), "extended CONNECT"),
    ],
)
def test_bad_connect_requests(
    method: str, headers: tuple[tuple[str, str], ...], reason: str
) -> None:
    with pytest.raises(BadConnectRequest) as e:
        parse_connect_request(method, "10.0.0.2:80", headers)
    assert reason in str(e.value)


def test_bad_optional_header_in_request_is_refused() -> None:
    with pytest.raises(InvalidHeader):
        parse_connect_request("CONNECT", "10.0.0.2:80", (("forwarded", "for=nope"),))


@pytest.mark.parametrize(
    "value",
    [
        "nope",
        "",
        "00-" + "a" * 32 + "-" + "b" * 16,  # a field missing
        "00-" + "a" * 32 + "-" + "b" * 16 + "-01-extra",
        "00-" + "g" * 32 + "-" + "b" * 16 + "-01",  # not hex
        "00-" + "0" * 32 + "-" + "b" * 16 + "-01",  # all-zero trace id
        "ff-" + "a" * 32 + "-" + "b" * 16 + "-01",  # forbidden version
        "0" * 55,  # ztunnel's length check alone would take this
    ],
)
def test_malformed_traceparent_is_ignored_not_refused(value: str) -> None:
    req = parse_connect_request("CONNECT", "10.0.0.2:80", (("traceparent", value),))
    assert req.traceparent is None
    assert str(req.authority) == "10.0.0.2:80"


def test_incoming_traceparent_is_kept() -> None:
    text = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    req = parse_connect_request("CONNECT", "10.0.0.2:80", (("traceparent", text),))
    assert req.traceparent is not None
    assert req.traceparent.trace_id == 0x4BF92F3577B34DA6A3CE929D0E0E4736


def test_hostname_length_limits_and_trailing_dot() -> None:
    from ztunnel_py.hbone.headers import is_valid_hostname

    assert not is_valid_hostname("")
    assert not is_valid_hostname(
        "a" * 63 + "." + "b" * 63 + "." + "c" * 63 + "." + "d" * 63 + ".ee"
    )
    assert is_valid_hostname("echo.default.svc.cluster.local.")


def test_forwarded_tolerates_empty_elements() -> None:
    fwd = parse_forwarded('for="10.0.0.1:80";;host=a.b')
    assert (fwd.for_port, fwd.host) == (80, "a.b")


def test_headers_without_optional_parts() -> None:
    assert request_headers() == []
    assert request_headers(traceparent=TraceParent(1, 1)) == [
        ("traceparent", str(TraceParent(1, 1)))
    ]
    assert response_headers(baggage=Baggage()) == []


def test_inner_connect_names_the_default_network_too() -> None:
    """ztunnel sends ``x-forwarded-network`` on every inner CONNECT of double HBONE, with an
    empty value from the default network: the receiver compares it with its own network."""
    headers = request_headers(forwarded_network="")
    assert headers == [("x-forwarded-network", "")]
    assert request_headers() == []  # a direct tunnel has none
