"""DNS wire handling (dnspython) and resolv.conf parsing: bad input, truncation, EDNS."""

from __future__ import annotations

import ipaddress

import dns.flags
import dns.message
import dns.opcode
import dns.rcode
import dns.rdatatype
import pytest

from ztunnel_py.dns.messages import (
    Protocol,
    Query,
    Refusal,
    error_response,
    mesh_response,
    parse_query,
    readdressed,
    relay_response,
    render,
)
from ztunnel_py.dns.resolvconf import parse_resolv_conf
from ztunnel_py.dns.resolver import MeshAnswer, MeshRecord, RecordType

HEADER = b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00"  # id 0x1234, one question


def query(name: str = "web.ns1.svc.cluster.local.", rdtype: str = "A", **kw: object) -> bytes:
    return dns.message.make_query(name, rdtype, **kw).to_wire()  # type: ignore[arg-type]


def parsed(wire: bytes) -> Query:
    q = parse_query(wire)
    assert isinstance(q, Query)
    return q


def test_a_query_parses() -> None:
    q = parsed(query("Web.NS1.svc.cluster.local."))
    assert q.labels == ("Web", "NS1", "svc", "cluster", "local")
    assert q.type_text == "A" and q.domain_text == "Web.NS1.svc.cluster.local."


@pytest.mark.parametrize(
    ("wire", "rcode"),
    [
        (b"", None),  # nothing to answer to
        (b"\x12\x34\x01\x00", None),  # shorter than a header
        (HEADER + b"\x05abc", dns.rcode.FORMERR),  # cut
        (b"\x12\x34\x81\x00" + b"\x00" * 8 + b"\xff", None),  # claims to be a response
        (HEADER + b"\x3f" + b"a" * 63, dns.rcode.FORMERR),
    ],
    ids=["empty", "short", "truncated question", "garbage response", "unterminated name"],
)  # fmt: skip
def test_malformed_bytes_get_formerr_or_nothing(wire: bytes, rcode: dns.rcode.Rcode | None) -> None:
    refusal = parse_query(wire)
    assert isinstance(refusal, Refusal)
    if rcode is None:
        assert refusal.wire is None
    else:
        assert refusal.wire is not None
        reply = dns.message.from_wire(refusal.wire)
        assert reply.id == 0x1234 and reply.rcode() == rcode and reply.flags & dns.flags.QR


def test_name_longer_than_255_octets_is_formerr() -> None:
    header = b"\x00\x07\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00"
    name = b"".join(b"\x3f" + b"a" * 63 for _ in range(5)) + b"\x00"
    refusal = parse_query(header + name + b"\x00\x01\x00\x01")
    assert isinstance(refusal, Refusal) and refusal.wire is not None
    assert dns.message.from_wire(refusal.wire).rcode() == dns.rcode.FORMERR


def test_response_as_query_is_formerr_and_other_opcodes_notimp() -> None:
    response = dns.message.make_response(dns.message.make_query("a.", "A"))
    refusal = parse_query(response.to_wire())
    assert isinstance(refusal, Refusal) and refusal.wire is not None
    assert dns.message.from_wire(refusal.wire).rcode() == dns.rcode.FORMERR
    notify = dns.message.make_query("a.", "SOA")
    notify.set_opcode(dns.opcode.NOTIFY)
    refusal = parse_query(notify.to_wire())
    assert isinstance(refusal, Refusal) and refusal.wire is not None
    assert dns.message.from_wire(refusal.wire).rcode() == dns.rcode.NOTIMP


def test_two_questions_are_formerr() -> None:
    q = dns.message.make_query("a.", "A")
    q.question.append(dns.message.make_query("b.", "A").question[0])
    refusal = parse_query(q.to_wire())
    assert isinstance(refusal, Refusal) and refusal.wire is not None
    assert dns.message.from_wire(refusal.wire).rcode() == dns.rcode.FORMERR


def test_mesh_answer_is_authoritative_with_ttl_30() -> None:
    q = parsed(query("web.ns1.", id=77))
    answer = MeshAnswer(
        (
            MeshRecord(("web", "ns1"), RecordType.A, "10.0.0.1"),
            MeshRecord(("web", "ns1"), RecordType.A, "10.0.0.2"),
        ),
        "success",
    )
    reply = dns.message.from_wire(render(mesh_response(q, answer), q, Protocol.UDP))
    assert reply.id == 77 and reply.rcode() == dns.rcode.NOERROR
    assert reply.flags & dns.flags.AA and reply.flags & dns.flags.RA
    (rrset,) = reply.answer
    assert rrset.ttl == 30 and sorted(r.address for r in rrset) == ["10.0.0.1", "10.0.0.2"]


def test_empty_mesh_answer_is_nodata_not_nxdomain() -> None:
    q = parsed(query("web.ns1.", "AAAA"))
    reply = dns.message.from_wire(
        render(mesh_response(q, MeshAnswer((), "no records")), q, Protocol.UDP)
    )
    assert reply.rcode() == dns.rcode.NOERROR and reply.answer == []


def test_udp_answer_too_big_is_truncated_and_tcp_is_not() -> None:
    many = tuple(MeshRecord(("h",), RecordType.A, f"10.0.{i // 250}.{i % 250}") for i in range(60))
    q = parsed(query("h.", use_edns=False))
    response = mesh_response(q, MeshAnswer(many, "success"))
    udp = dns.message.from_wire(render(response, q, Protocol.UDP))
    assert udp.flags & dns.flags.TC and udp.answer == []
    tcp = dns.message.from_wire(render(response, q, Protocol.TCP))
    assert not tcp.flags & dns.flags.TC and len(tcp.answer[0]) == 60
    # A client announcing a bigger EDNS payload gets it all over UDP.
    q_edns = parsed(query("h.", use_edns=0, payload=1232))
    big = dns.message.from_wire(
        render(mesh_response(q_edns, MeshAnswer(many, "success")), q_edns, Protocol.UDP)
    )
    assert not big.flags & dns.flags.TC and len(big.answer[0]) == 60 and big.edns == 0


def test_relay_keeps_upstream_rcode_and_records_under_the_clients_id() -> None:
    q = parsed(query("www.example.test.", id=9))
    upstream_query = dns.message.make_query("www.example.test.", "A", id=4242)
    upstream = dns.message.make_response(upstream_query)
    upstream.set_rcode(dns.rcode.NXDOMAIN)
    reply = dns.message.from_wire(render(relay_response(q, upstream), q, Protocol.UDP))
    assert reply.id == 9 and reply.rcode() == dns.rcode.NXDOMAIN
    assert not reply.flags & dns.flags.AA
    assert reply.question[0].name.to_text() == "www.example.test."


def test_error_response_is_servfail() -> None:
    q = parsed(query())
    reply = dns.message.from_wire(
        render(error_response(q.message, dns.rcode.SERVFAIL), q, Protocol.UDP)
    )
    assert reply.rcode() == dns.rcode.SERVFAIL and reply.flags & dns.flags.QR


def test_resolv_conf() -> None:
    conf = parse_resolv_conf(
        """# kubelet's file
nameserver 10.96.0.10
nameserver fe80::1%eth0
nameserver not-an-ip
nameserver 10.0.0.3
nameserver 10.0.0.4
search default.svc.cluster.local svc.cluster.local cluster.local
options ndots:5 timeout:1 attempts:3
"""
    )
    assert conf.nameservers == (
        (ipaddress.ip_address("10.96.0.10"), 53),
        (ipaddress.ip_address("fe80::1"), 53),
        (ipaddress.ip_address("10.0.0.3"), 53),
    )
    assert conf.search == ("default.svc.cluster.local", "svc.cluster.local", "cluster.local")
    assert conf.timeout_s == 1.0 and conf.attempts == 3
    assert conf.problems == ("line 4: 'not-an-ip' is not an IP address",)


def test_resolv_conf_defaults() -> None:
    conf = parse_resolv_conf("")
    assert conf.nameservers == ((ipaddress.ip_address("127.0.0.1"), 53),)
    assert (conf.timeout_s, conf.attempts, conf.search) == (5.0, 2, ())
    capped = parse_resolv_conf("nameserver 1.1.1.1\noptions timeout:0 attempts:99\n")
    assert (capped.timeout_s, capped.attempts) == (1.0, 5)


def test_query_type_text_for_unknown_types() -> None:
    q = parsed(query("a.", dns.rdatatype.to_text(dns.rdatatype.RdataType.make(65280))))
    assert q.type_text == "TYPE65280"


def test_readdressed_answer_has_the_clients_id_and_no_aa() -> None:
    q = parsed(query("www.example.test.", id=9))
    upstream = dns.message.make_response(dns.message.make_query("www.example.test.", "A", id=4))
    upstream.flags |= dns.flags.AA
    reply = dns.message.from_wire(readdressed(upstream.to_wire(), q))
    assert reply.id == 9 and not reply.flags & dns.flags.AA and reply.flags & dns.flags.QR
