"""DNS messages in and out of the proxy, through dnspython (pure: no I/O).

``parse_query`` turns a client's bytes into a ``Query`` or says how to refuse them (as
ztunnel's handler: a response sent as a query is FORMERR, an opcode other than QUERY is
NOTIMP, bytes that do not parse are FORMERR when their header can carry the answer, else
dropped). ``mesh_response``/``error_response``/``relay_response`` build the replies;
``render`` fits them to the client's transport (UDP: 512 bytes, or the client's EDNS payload
size; too big sets TC so the client retries over TCP).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import dns.edns
import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rrset

from ztunnel_py.dns.resolver import TTL_SECONDS, Labels, MeshAnswer, RecordType

UDP_DEFAULT_PAYLOAD = 512
TCP_MAX_MESSAGE = 65535
MAX_EDNS_PAYLOAD = 4096  # what we accept to send back over UDP, whatever the client asks


class Protocol:
    UDP = "udp"
    TCP = "tcp"


@dataclass(frozen=True, slots=True)
class Query:
    message: dns.message.Message
    qname: dns.name.Name
    rdtype: int
    wire: bytes  # as the client sent it

    @property
    def labels(self) -> Labels:
        """The asked name without its root, in the client's spelling."""
        return tuple(label.decode("ascii", "replace") for label in self.qname.labels if label)

    @property
    def type_text(self) -> str:
        return dns.rdatatype.to_text(dns.rdatatype.RdataType.make(self.rdtype))

    @property
    def domain_text(self) -> str:
        return self.qname.to_text()

    def udp_payload(self) -> int:
        """The largest UDP response this client takes."""
        if self.message.edns >= 0:
            return max(UDP_DEFAULT_PAYLOAD, min(self.message.payload, MAX_EDNS_PAYLOAD))
        return UDP_DEFAULT_PAYLOAD


@dataclass(frozen=True, slots=True)
class Refusal:
    """Bytes we answer without a usable query: a reply (``wire``) or nothing (drop)."""

    wire: bytes | None
    reason: str


def parse_query(wire: bytes) -> Query | Refusal:
    try:
        message = dns.message.from_wire(wire)
    except (dns.exception.DNSException, ValueError, IndexError, struct.error) as e:
        return Refusal(_header_error(wire, dns.rcode.FORMERR), f"malformed query: {e}")
    if message.flags & dns.flags.QR:
        return Refusal(_render_error(message, dns.rcode.FORMERR), "got a response as a request")
    if message.opcode() != dns.opcode.QUERY:
        return Refusal(
            _render_error(message, dns.rcode.NOTIMP),
            f"unimplemented opcode {dns.opcode.to_text(message.opcode())}",
        )
    if len(message.question) != 1:
        return Refusal(
            _render_error(message, dns.rcode.FORMERR),
            f"{len(message.question)} questions in one query",
        )
    question = message.question[0]
    return Query(message, question.name, int(question.rdtype), wire)


def _header_error(wire: bytes, rcode: dns.rcode.Rcode) -> bytes | None:
    """FORMERR for bytes dnspython could not read: only the id and opcode survive."""
    if len(wire) < 12:
        return None
    ident, flags = struct.unpack_from("!HH", wire)
    if flags & dns.flags.QR:
        return None  # never answer something that claims to be a response
    out = dns.message.Message(id=ident)
    out.flags = dns.flags.QR | (flags & dns.flags.RD)
    out.set_opcode(dns.opcode.from_flags(flags))
    out.set_rcode(rcode)
    return out.to_wire()


def _render_error(query: dns.message.Message, rcode: dns.rcode.Rcode) -> bytes | None:
    if query.flags & dns.flags.QR:
        out = dns.message.Message(id=query.id)
        out.flags = dns.flags.QR
        out.set_rcode(rcode)
        return out.to_wire()
    return error_response(query, rcode).to_wire()


def _response(query: dns.message.Message) -> dns.message.Message:
    response = dns.message.make_response(query, recursion_available=True)
    if query.edns >= 0:
        response.use_edns(0, 0, max(UDP_DEFAULT_PAYLOAD, min(query.payload, MAX_EDNS_PAYLOAD)))
    return response


def error_response(query: dns.message.Message, rcode: dns.rcode.Rcode) -> dns.message.Message:
    response = _response(query)
    response.set_rcode(rcode)
    return response


def mesh_response(query: Query, answer: MeshAnswer) -> dns.message.Message:
    """An authoritative NOERROR answer with the mesh's records (possibly none)."""
    response = _response(query.message)
    response.flags |= dns.flags.AA
    for record in answer.records:
        owner = dns.name.Name((*(lab.encode() for lab in record.name), b""))
        if record.rdtype == RecordType.CNAME:
            rdata = record.value.rstrip(".") + "."
        else:
            rdata = record.value
        rrset = response.find_rrset(
            dns.message.ANSWER,
            owner,
            dns.rdataclass.IN,
            dns.rdatatype.RdataType.make(record.rdtype),
            create=True,
        )
        rrset.update_ttl(TTL_SECONDS)
        rrset.add(
            dns.rdata.from_text(
                dns.rdataclass.IN, dns.rdatatype.RdataType.make(record.rdtype), rdata
            ),
            TTL_SECONDS,
        )
    return response


def relay_response(query: Query, upstream: dns.message.Message) -> dns.message.Message:
    """The upstream resolver's answer, readdressed to our client (its id and question)."""
    response = _response(query.message)
    response.set_rcode(upstream.rcode())
    response.flags |= upstream.flags & (dns.flags.AD | dns.flags.CD)
    response.answer = list(upstream.answer)
    response.authority = list(upstream.authority)
    response.additional = [r for r in upstream.additional if r.rdtype != dns.rdatatype.OPT]
    return response


def render(response: dns.message.Message, query: Query, protocol: str) -> bytes:
    """Wire bytes for ``protocol``; a UDP answer too big for the client is sent with TC set
    and no records, so the client asks again over TCP."""
    limit = query.udp_payload() if protocol == Protocol.UDP else TCP_MAX_MESSAGE
    try:
        return response.to_wire(max_size=limit)
    except dns.exception.TooBig:
        truncated = _response(query.message)
        truncated.set_rcode(response.rcode())
        truncated.flags |= dns.flags.TC | (response.flags & dns.flags.AA)
        return truncated.to_wire(max_size=limit)


def readdressed(upstream_wire: bytes, query: Query) -> bytes:
    """The upstream's answer as it came, under the client's id and without AA: like ztunnel,
    the proxy never passes a forwarded answer off as authoritative."""
    (flags,) = struct.unpack_from("!H", upstream_wire, 2)
    return query.wire[:2] + struct.pack("!H", flags & ~dns.flags.AA) + upstream_wire[4:]


def answer_count(message: dns.message.Message) -> int:
    return sum(len(rrset) for rrset in message.answer)
