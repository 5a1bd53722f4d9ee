"""HBONE request and response headers: build them, and parse what a peer sent.

An HBONE request is a classic HTTP/2 CONNECT: ``:method CONNECT`` and ``:authority``, no
``:scheme`` or ``:path``. ztunnel adds ``forwarded`` (original client, and the service host when
the target was a Service), ``baggage`` (telemetry about the source; the 200 response carries the
destination's), and ``traceparent`` (a random id per outbound connection). Parsers raise
``InvalidHeader``/``BadConnectRequest`` with the offending value; the inbound side answers 400.
A malformed ``traceparent`` is the exception: it only names the connection in the access log,
so the request goes on without it (ztunnel does the same).
"""

from __future__ import annotations

import ipaddress
import random
import re
from collections.abc import Iterable
from dataclasses import dataclass

from ztunnel_py.hbone.errors import BadConnectRequest, InvalidAuthority, InvalidHeader
from ztunnel_py.hbone.events import Headers

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

FORWARDED = "forwarded"
BAGGAGE = "baggage"
TRACEPARENT = "traceparent"
X_FORWARDED_NETWORK = "x-forwarded-network"

_LABEL = re.compile(r"^(?!-)[A-Za-z0-9_-]{1,63}(?<!-)$")
_TRACEPARENT = re.compile(r"^([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")
_TOKEN_VALUE = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]*$")


# --------------------------------------------------------------------------- :authority


@dataclass(frozen=True, slots=True)
class Authority:
    """The tunnel target: an IP (the usual case) or a service hostname, and a port."""

    host: IPAddress | str
    port: int

    @property
    def ip(self) -> IPAddress | None:
        return self.host if not isinstance(self.host, str) else None

    def __str__(self) -> str:
        return format_authority(self.host, self.port)


def format_authority(host: IPAddress | str, port: int) -> str:
    """``10.0.0.1:80``, ``[fd00::1]:80`` or ``echo.default.svc.cluster.local:80``."""
    if isinstance(host, ipaddress.IPv6Address):
        return f"[{host}]:{port}"
    return f"{host}:{port}"


def _parse_port(value: str, port_text: str) -> int:
    if not port_text.isdigit() or len(port_text) > 5:
        raise InvalidAuthority(value, f"port {port_text!r} is not a number")
    port = int(port_text)
    if not 0 < port < 65536:
        raise InvalidAuthority(value, f"port {port} is outside 1-65535")
    return port


def is_valid_hostname(name: str) -> bool:
    if not name or len(name) > 253:
        return False
    labels = name[:-1].split(".") if name.endswith(".") else name.split(".")
    return all(_LABEL.match(label) for label in labels)


def parse_authority(value: str) -> Authority:
    """Parse ``<ip>:<port>``, ``[<ipv6>]:<port>`` or ``<hostname>:<port>``."""
    if not value:
        raise InvalidAuthority(value, "empty; expected <ip>:<port> or <hostname>:<port>")
    if value.startswith("["):
        close = value.find("]")
        if close < 0 or value[close + 1 : close + 2] != ":":
            raise InvalidAuthority(value, "expected [<ipv6>]:<port>")
        try:
            ip6 = ipaddress.IPv6Address(value[1:close])
        except ValueError:
            raise InvalidAuthority(value, "the bracketed host is not an IPv6 address") from None
        return Authority(ip6, _parse_port(value, value[close + 2 :]))
    host, sep, port_text = value.rpartition(":")
    if not sep or not host:
        raise InvalidAuthority(value, "missing port; expected <host>:<port>")
    if ":" in host:
        raise InvalidAuthority(value, "an IPv6 address must be in brackets: [<ipv6>]:<port>")
    port = _parse_port(value, port_text)
    try:
        return Authority(ipaddress.IPv4Address(host), port)
    except ValueError:
        pass
    if host.replace(".", "").isdigit():
        raise InvalidAuthority(value, f"{host!r} is not a valid IPv4 address")
    if not is_valid_hostname(host):
        raise InvalidAuthority(value, f"{host!r} is not a valid hostname")
    return Authority(host.lower(), port)


# --------------------------------------------------------------------------- forwarded


@dataclass(frozen=True, slots=True)
class Forwarded:
    """``for="<client ip>:<port>"`` and, when the target was a Service, ``;host=<fqdn>``."""

    for_ip: IPAddress
    for_port: int
    host: str | None = None

    def __str__(self) -> str:
        return format_forwarded(self.for_ip, self.for_port, self.host)


def format_forwarded(ip: IPAddress, port: int, host: str | None = None) -> str:
    text = f'for="{format_authority(ip, port)}"'
    return f"{text};host={host}" if host else text


def parse_forwarded(value: str) -> Forwarded:
    """Read the first element of a ``forwarded`` header (RFC 7239) as ztunnel writes it."""
    first = value.split(",", 1)[0]
    params: dict[str, str] = {}
    for raw in first.split(";"):
        pair = raw.strip()
        if not pair:
            continue
        key, sep, val = pair.partition("=")
        if not sep:
            raise InvalidHeader(FORWARDED, value, f"{pair!r} is not key=value")
        key = key.strip().lower()
        if key in params:
            raise InvalidHeader(FORWARDED, value, f"{key!r} appears twice")
        if val.startswith('"'):
            if len(val) < 2 or not val.endswith('"'):
                raise InvalidHeader(FORWARDED, value, f"unterminated quoted value for {key!r}")
            val = val[1:-1]
        params[key] = val
    if "for" not in params:
        raise InvalidHeader(FORWARDED, value, 'missing for="<ip>:<port>"')
    try:
        authority = parse_authority(params["for"])
    except InvalidAuthority as e:
        raise InvalidHeader(FORWARDED, value, f"for= {e.reason}") from None
    if authority.ip is None:
        raise InvalidHeader(FORWARDED, value, "for= must be an IP address, not a hostname")
    host = params.get("host") or None
    if host is not None and not is_valid_hostname(host):
        raise InvalidHeader(FORWARDED, value, f"host={host!r} is not a valid hostname")
    return Forwarded(authority.ip, authority.port, host)


# --------------------------------------------------------------------------- baggage

_WORKLOAD_TYPES = ("deployment", "cronjob", "pod", "job")


@dataclass(frozen=True, slots=True, kw_only=True)
class Baggage:
    """Telemetry about one end of a tunnel (ztunnel ``baggage.rs``); unset fields are omitted."""

    cluster_id: str | None = None
    namespace: str | None = None
    workload_type: str = "deployment"
    workload_name: str | None = None
    service_name: str | None = None
    revision: str | None = None
    region: str | None = None
    zone: str | None = None

    def __str__(self) -> str:
        return format_baggage(self)


def format_baggage(b: Baggage) -> str:
    workload_type = b.workload_type if b.workload_type in _WORKLOAD_TYPES else "deployment"
    pairs = (
        ("k8s.cluster.name", b.cluster_id),
        ("k8s.namespace.name", b.namespace),
        (f"k8s.{workload_type}.name", b.workload_name),
        ("service.name", b.service_name),
        ("service.version", b.revision),
        ("cloud.region", b.region),
        ("cloud.availability_zone", b.zone),
    )
    return ",".join(f"{k}={v}" for k, v in pairs if v)


def parse_baggage(value: str) -> Baggage:
    """Read the keys ztunnel knows; other W3C baggage members are ignored, as ztunnel does."""
    fields: dict[str, str | None] = {}
    workload_type = "deployment"
    for raw in value.split(","):
        member = raw.strip()
        if not member:
            continue
        key, sep, val = member.partition("=")
        if not sep:
            raise InvalidHeader(BAGGAGE, value, f"member {member!r} is not key=value")
        key = key.strip()
        val = val.split(";", 1)[0].strip()  # W3C members may carry ;properties
        if not _TOKEN_VALUE.match(key) or not key:
            raise InvalidHeader(BAGGAGE, value, f"key {key!r} is not an HTTP token")
        if any(c in val for c in ' ",\\') or not val.isprintable():
            raise InvalidHeader(BAGGAGE, value, f"value of {key} has characters baggage forbids")
        v = val or None
        if key == "k8s.cluster.name":
            fields["cluster_id"] = v
        elif key == "k8s.namespace.name":
            fields["namespace"] = v
        elif key.startswith("k8s.") and key.endswith(".name") and key[4:-5] in _WORKLOAD_TYPES:
            fields["workload_name"] = v
            workload_type = key[4:-5]
        elif key == "service.name":
            fields["service_name"] = v
        elif key == "service.version":
            fields["revision"] = v
        elif key == "cloud.region":
            fields["region"] = v
        elif key == "cloud.availability_zone":
            fields["zone"] = v
    return Baggage(workload_type=workload_type, **fields)


# --------------------------------------------------------------------------- traceparent


@dataclass(frozen=True, slots=True)
class TraceParent:
    """W3C ``traceparent``: ztunnel sends version 00, a random trace and span id, flags 00."""

    trace_id: int
    span_id: int
    flags: int = 0

    def __str__(self) -> str:
        return f"00-{self.trace_id:032x}-{self.span_id:016x}-{self.flags:02x}"


def new_traceparent(rng: random.Random) -> TraceParent:
    """A fresh random id; ids of all zeros are invalid in W3C, so they are never drawn."""
    return TraceParent(rng.getrandbits(128) or 1, rng.getrandbits(64) or 1, 0)


def parse_traceparent(value: str) -> TraceParent:
    m = _TRACEPARENT.match(value.strip())
    if m is None:
        raise InvalidHeader(TRACEPARENT, value, "expected 00-<32 hex>-<16 hex>-<2 hex>, lower-case")
    version, trace, span, flags = m.groups()
    if version == "ff":
        raise InvalidHeader(TRACEPARENT, value, "version ff is forbidden")
    trace_id, span_id = int(trace, 16), int(span, 16)
    if trace_id == 0 or span_id == 0:
        raise InvalidHeader(TRACEPARENT, value, "trace id and span id must not be all zeros")
    return TraceParent(trace_id, span_id, int(flags, 16))


def _lenient_traceparent(value: str | None) -> TraceParent | None:
    """A request's ``traceparent``, or ``None`` when absent or malformed: as in ztunnel, a
    bad trace id never fails the request (the inbound side then draws a fresh one)."""
    if value is None:
        return None
    try:
        return parse_traceparent(value)
    except InvalidHeader:
        return None


# --------------------------------------------------------------------------- requests


@dataclass(frozen=True, slots=True, kw_only=True)
class ConnectRequest:
    """A parsed HBONE request; optional headers that were absent are ``None``."""

    authority: Authority
    forwarded: Forwarded | None = None
    baggage: Baggage | None = None
    traceparent: TraceParent | None = None
    forwarded_network: str | None = None


def request_headers(
    *,
    forwarded: Forwarded | None = None,
    baggage: Baggage | None = None,
    traceparent: TraceParent | None = None,
    forwarded_network: str | None = None,
    extra: Iterable[tuple[str, str]] = (),
) -> list[tuple[str, str]]:
    """The regular (non-pseudo) headers of an HBONE CONNECT, as ztunnel sends them."""
    headers: list[tuple[str, str]] = []
    if forwarded is not None:
        headers.append((FORWARDED, str(forwarded)))
    if baggage is not None:
        text = format_baggage(baggage)
        if text:
            headers.append((BAGGAGE, text))
    if traceparent is not None:
        headers.append((TRACEPARENT, str(traceparent)))
    if forwarded_network is not None:  # sent even when empty (the default network), as ztunnel
        headers.append((X_FORWARDED_NETWORK, forwarded_network))
    headers.extend(extra)
    return headers


def header_value(headers: Headers, name: str) -> str | None:
    """The first value of ``name`` (lower-case), or ``None``."""
    for k, v in headers:
        if k == name:
            return v
    return None


def parse_connect_request(method: str, authority: str, headers: Headers) -> ConnectRequest:
    """Validate a request as the inbound side must: CONNECT, no :scheme/:path, good headers."""
    if method != "CONNECT":
        raise BadConnectRequest(f"method {method!r} is not CONNECT")
    names = {k for k, _ in headers}
    if ":path" in names or ":scheme" in names or ":protocol" in names:
        raise BadConnectRequest("extended CONNECT (:protocol, :scheme, :path) is not HBONE")
    parsed = parse_authority(authority)
    fwd = header_value(headers, FORWARDED)
    bag = [v for k, v in headers if k == BAGGAGE]
    tp = header_value(headers, TRACEPARENT)
    return ConnectRequest(
        authority=parsed,
        forwarded=parse_forwarded(fwd) if fwd is not None else None,
        baggage=parse_baggage(",".join(bag)) if bag else None,
        traceparent=_lenient_traceparent(tp),
        forwarded_network=header_value(headers, X_FORWARDED_NETWORK),
    )


def response_headers(*, baggage: Baggage | None = None) -> list[tuple[str, str]]:
    """The regular headers of an HBONE response (the status is set by accept/reject)."""
    headers: list[tuple[str, str]] = []
    if baggage is not None:
        text = format_baggage(baggage)
        if text:
            headers.append((BAGGAGE, text))
    return headers
