"""ztunnel's local-config YAML (``LOCAL_XDS_PATH`` / ``LOCAL_XDS``) into an ``UpdateBatch``.

The format is ztunnel's ``LocalConfig``: top-level ``workloads``, ``policies`` and ``services``
(all optional), camelCase keys matching ``/config_dump``, and unknown fields refused, so a file
written for ztunnel loads here unchanged and a typo is caught. Every error names the path of the
offending field, e.g. ``workloads[1].workloadIps[0]: '10.0.0.300' is not an IP address``.

The document's shape is declared once, as msgspec ``Struct``s (field names, types, required
fields, unknown fields refused); msgspec finds what does not fit and ``_schema_error`` turns its
report into ztunnel's field paths. What a type cannot say (enum spellings, IPs, CIDRs, maps keyed
by ports or ``namespace/hostname``, a uid derived from a name) is read while building the model,
with the path of each value. As with ztunnel's serde schema, a string field takes a string
(``namespace: 5`` is refused); numbers may be written as strings of digits.
"""

from __future__ import annotations

import difflib
import enum
import ipaddress
import re
import typing
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import msgspec

from ztunnel_py.errors import LocalConfigError
from ztunnel_py.ip import IPNetwork, ZonedAddressError, parse_ip, parse_network
from ztunnel_py.rbac.model import (
    MATCH_LISTS,
    Action,
    Authorization,
    Match,
    MatchList,
    Scope,
    ServiceAccountMatch,
    StringMatch,
    StringMatchKind,
)
from ztunnel_py.state.model import (
    DEFAULT_CLUSTER_ID,
    DEFAULT_SERVICE_ACCOUNT,
    DEFAULT_TRUST_DOMAIN,
    DEFAULT_WORKLOAD_TYPE,
    ApplicationTunnel,
    AppTunnelProtocol,
    GatewayAddress,
    HealthStatus,
    InboundProtocol,
    IPAddress,
    IpFamily,
    LoadBalancer,
    LoadBalancerHealthPolicy,
    LoadBalancerMode,
    LoadBalancerScope,
    Locality,
    NamespacedHostname,
    NetworkAddress,
    NetworkMode,
    Service,
    Visibility,
    WeightedWaypoint,
    Workload,
    frozen_map,
)
from ztunnel_py.state.store import UpdateBatch
from ztunnel_py.xds.yaml_load import MAX_FILE_BYTES, load_yaml, read_config_file

_T = TypeVar("_T")
_E = TypeVar("_E", bound=enum.Enum)

# --------------------------------------------------------------------------- leaf types


class Port(int):
    """0..65535; a string of digits is taken as the number."""


class Count(int):
    """0..2**32-1 (``capacity``)."""


class Ip(str):
    """An IPv4 or IPv6 address (checked; the model parses it again)."""


class Cidr(str):
    """An IP address or prefix."""


def _kind(value: Any) -> str:
    if value is None:
        return "nothing"
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean"}.get(
        type(value), type(value).__name__
    )


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise ValueError(f"expected a string, got {_kind(value)}")
    return str(value)


def _integer(value: Any, *, minimum: int = 0, maximum: int = 2**32 - 1) -> int:
    number = int(value) if isinstance(value, str) and value.strip().isdigit() else value
    if isinstance(number, bool) or not isinstance(number, int):
        raise ValueError(f"expected an integer, got {_kind(value)}")
    if not minimum <= number <= maximum:
        raise ValueError(f"{number} is out of range {minimum}..{maximum}")
    return number


def _ip(value: Any) -> IPAddress:
    text = _text(value)
    try:
        return parse_ip(text)
    except ZonedAddressError:
        raise  # its own message: the zone is what to remove
    except ValueError:
        raise ValueError(f"{value!r} is not an IP address") from None


def _cidr(value: Any) -> IPNetwork:
    text = _text(value)
    try:
        return parse_network(text)
    except ZonedAddressError:
        raise
    except ValueError:
        raise ValueError(f"{text!r} is not an IP address or CIDR") from None


def _decode_leaf(kind: type, value: Any) -> Any:
    """msgspec's hook for the leaf types: a ``ValueError`` becomes an error at the value's path."""
    if kind is Port:
        return Port(_integer(value, maximum=65535))
    if kind is Count:
        return Count(_integer(value))
    if kind is Ip:
        return Ip(_ip(value))
    if kind is Cidr:
        return Cidr(_cidr(value))
    raise NotImplementedError(kind)


# --------------------------------------------------------------------------- the schema


class _Spec(msgspec.Struct, rename="camel", forbid_unknown_fields=True):
    pass


class AddressSpec(_Spec):
    """A gateway destination spelled as a mapping: {network, address} or {namespace, hostname}."""

    network: str | None = None
    address: Ip | None = None
    namespace: str | None = None
    hostname: str | None = None


class GatewaySpec(_Spec):
    destination: str | AddressSpec
    hbone_mtls_port: Port = Port(15008)


class ApplicationTunnelSpec(_Spec):
    protocol: str | None = None
    port: Port | None = None


class LocalitySpec(_Spec):
    region: str | None = None
    zone: str | None = None
    subzone: str | None = None


class WorkloadSpec(_Spec):
    namespace: str
    uid: str | None = None
    name: str | None = None
    workload_ips: list[Ip] | None = None
    hostname: str | None = None
    network: str | None = None
    protocol: str | None = None
    trust_domain: str | None = None
    service_account: str | None = None
    waypoint: GatewaySpec | None = None
    network_gateway: GatewaySpec | None = None
    node: str | None = None
    canonical_name: str | None = None
    canonical_revision: str | None = None
    workload_type: str | None = None
    workload_name: str | None = None
    native_tunnel: bool | None = None
    application_tunnel: ApplicationTunnelSpec | None = None
    # namespace/hostname -> {service port: target port}: keys checked with their paths below.
    services: dict[Any, Any] | None = None
    authorization_policies: list[str] | None = None
    status: str | None = None
    cluster_id: str | None = None
    locality: LocalitySpec | None = None
    network_mode: str | None = None
    capacity: Count | None = None


class LoadBalancerSpec(_Spec):
    routing_preferences: list[str] | None = None
    mode: str | None = None
    health_policy: str | None = None


class WeightedWaypointSpec(_Spec):
    destination: GatewaySpec  # ztunnel's WeightedWaypoint: a whole GatewayAddress
    weight: Count = Count(0)


class ServiceSpec(_Spec):
    name: str
    namespace: str
    hostname: str
    vips: list[str] | None = None
    cidr_vips: list[str] | None = None
    ports: dict[Any, Any] | None = None  # service port -> target port, checked below
    endpoints: dict[Any, Any] | None = None  # /config_dump's view; the workloads say it
    subject_alt_names: list[str] | None = None
    waypoint: GatewaySpec | None = None
    weighted_waypoints: list[WeightedWaypointSpec] | None = None
    load_balancer: LoadBalancerSpec | None = None
    ip_families: str | None = None
    canonical: bool | None = None
    visibility: str | None = None


class StringMatchSpec(msgspec.Struct, forbid_unknown_fields=True):
    """Exactly one of ztunnel's spellings; a bare string is an exact match."""

    Exact: str | None = None
    Prefix: str | None = None
    Suffix: str | None = None
    Presence: Any = msgspec.UNSET


class ServiceAccountSpec(_Spec):
    namespace: str
    service_account: str


class MatchSpec(_Spec):
    namespaces: list[str | StringMatchSpec] | None = None
    not_namespaces: list[str | StringMatchSpec] | None = None
    service_accounts: list[ServiceAccountSpec] | None = None
    not_service_accounts: list[ServiceAccountSpec] | None = None
    principals: list[str | StringMatchSpec] | None = None
    not_principals: list[str | StringMatchSpec] | None = None
    source_ips: list[Cidr] | None = None
    not_source_ips: list[Cidr] | None = None
    destination_ips: list[Cidr] | None = None
    not_destination_ips: list[Cidr] | None = None
    destination_ports: list[Port] | None = None
    not_destination_ports: list[Port] | None = None


class PolicySpec(_Spec):
    name: str
    namespace: str
    scope: str | None = None
    action: str | None = None
    rules: list[list[list[MatchSpec]]] | None = None
    dry_run: bool | None = None


class LocalConfigSpec(_Spec):
    workloads: list[WorkloadSpec] | None = None
    policies: list[PolicySpec] | None = None
    services: list[ServiceSpec] | None = None


# --------------------------------------------------------------------------- schema errors

_AT = re.compile(r"^(?P<message>.*?)(?: - at `\$(?P<path>[^`]*)`)?$", re.DOTALL)
_UNKNOWN = re.compile(r"Object contains unknown field `(?P<field>[^`]*)`")
_MISSING = re.compile(r"Object missing required field `(?P<field>[^`]*)`")
_EXPECTED = re.compile(r"Expected `(?P<want>[^`]*)`, got `(?P<got>[^`]*)`")
_TYPE_NAMES = {
    "object": "a mapping",
    "array": "a list",
    "str": "a string",
    "int": "an integer",
    "float": "a number",
    "bool": "a boolean",
    "null": "nothing",
}


def _schema_error(e: msgspec.ValidationError) -> LocalConfigError:
    """msgspec's ``<message> - at `$.a[0].b``` as ztunnel's ``a[0].b: <reason>``."""
    m = _AT.match(str(e))
    assert m is not None  # the pattern matches any text
    message, path = m["message"], (m["path"] or "").removeprefix(".")
    if unknown := _UNKNOWN.fullmatch(message):
        field = unknown["field"]
        hint = _closest(field, _fields_at(path))
        reason = "unknown field" + (f" (did you mean {hint!r}?)" if hint else "")
        return LocalConfigError(_child(path, field), reason)
    if missing := _MISSING.fullmatch(message):
        return LocalConfigError(_child(path, missing["field"]), "missing required field")
    if expected := _EXPECTED.fullmatch(message):
        first = next(t for t in expected["want"].split(" | ") if t != "null")
        want = _TYPE_NAMES.get(first, first)
        got = _TYPE_NAMES.get(expected["got"], expected["got"])
        return LocalConfigError(path or "<document>", f"expected {want}, got {got}")
    return LocalConfigError(path or "<document>", message)


def _fields_at(path: str) -> set[str]:
    """The keys the Struct at ``path`` (``workloads[0].waypoint``) allows."""
    spec: Any = LocalConfigSpec
    for name in re.findall(r"[^.\[\]]+", path):
        if name.isdigit():
            continue
        spec = _struct_in(_field_type(spec, name))
    return set(spec.__struct_encode_fields__) if spec is not None else set()


def _field_type(spec: Any, encoded: str) -> Any:
    if spec is None:
        return None
    hints = typing.get_type_hints(spec)
    for name, key in zip(spec.__struct_fields__, spec.__struct_encode_fields__, strict=True):
        if key == encoded:
            return hints[name]
    return None


def _struct_in(tp: Any) -> Any:
    """The Struct inside ``list[list[X]] | None`` and the like."""
    if isinstance(tp, type) and issubclass(tp, msgspec.Struct):
        return tp
    for arg in typing.get_args(tp):
        found = _struct_in(arg)
        if found is not None:
            return found
    return None


def _closest(key: str, allowed: set[str]) -> str | None:
    matches = difflib.get_close_matches(key, sorted(allowed), n=1, cutoff=0.7)
    return matches[0] if matches else None


def _child(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


# --------------------------------------------------------------------------- spec -> model


def _fail(path: str, reason: str) -> LocalConfigError:
    return LocalConfigError(path or "<document>", reason)


def _enum(path: str, kind: type[_E], text: str) -> _E:
    folded = text.replace("_", "").lower()
    for member in kind:
        names = {str(member.value).replace("_", "").lower(), member.name.replace("_", "").lower()}
        if folded in names:
            return member
    allowed = ", ".join(str(m.value) for m in kind)
    raise _fail(path, f"{text!r} is not one of {allowed}")


def _opt_enum(path: str, kind: type[_E], text: str | None, default: _E) -> _E:
    return default if text is None else _enum(path, kind, text)


def _parsed(path: str, parse: Callable[[str], _T], text: str) -> _T:
    try:
        return parse(text)
    except ValueError as e:
        raise _fail(path, str(e)) from None


def _leaf(path: str, read: Callable[[Any], _T], value: Any) -> _T:
    try:
        return read(value)
    except ValueError as e:
        raise _fail(path, str(e)) from None


def _port_map(path: str, raw: Mapping[Any, Any] | None) -> Mapping[int, int]:
    if raw is None:
        return frozen_map()
    ports: dict[int, int] = {}
    for key, value in raw.items():
        where = _child(path, str(key))
        port = _leaf(where, lambda v: _integer(v, maximum=65535), key)
        ports[port] = _leaf(where, lambda v: _integer(v, maximum=65535), value)
    return frozen_map(ports)


def _gateway(path: str, spec: GatewaySpec) -> GatewayAddress:
    dest = spec.destination
    where = _child(path, "destination")
    destination: NetworkAddress | NamespacedHostname
    if isinstance(dest, AddressSpec):
        if dest.address is not None:
            destination = NetworkAddress(dest.network or "", ipaddress.ip_address(dest.address))
        elif dest.hostname is not None and dest.namespace is not None:
            destination = NamespacedHostname(dest.namespace, dest.hostname)
        else:
            raise _fail(where, "expected {network, address} or {namespace, hostname}")
    else:
        try:
            destination = NetworkAddress.parse(dest)
        except ValueError:
            destination = _parsed(where, NamespacedHostname.parse, dest)
    return GatewayAddress(destination=destination, hbone_mtls_port=int(spec.hbone_mtls_port))


def build_workload(path: str, w: WorkloadSpec, *, cluster_id: str) -> Workload:
    if not w.namespace:
        raise _fail(_child(path, "namespace"), "must not be empty")
    uid = w.uid or ""
    if not uid:
        if not w.name:
            raise _fail(path, "a workload needs a uid or a name")
        uid = f"{cluster_id}//v1/Pod/{w.namespace}/{w.name}"
    services: dict[str, Mapping[int, int]] = {}
    if w.services is not None:
        for key, ports in w.services.items():
            where = _child(_child(path, "services"), str(key))
            _parsed(where, NamespacedHostname.parse, _leaf(where, _text, key))
            services[str(key)] = _port_map(where, ports)
    tunnel = None
    if w.application_tunnel is not None:
        at = w.application_tunnel
        tunnel = ApplicationTunnel(
            protocol=_opt_enum(
                _child(path, "applicationTunnel.protocol"),
                AppTunnelProtocol,
                at.protocol,
                AppTunnelProtocol.NONE,
            ),
            port=int(at.port) if at.port is not None else None,
        )
    loc = w.locality
    return Workload(
        uid=uid,
        name=w.name or "",
        namespace=w.namespace,
        workload_ips=tuple(ipaddress.ip_address(ip) for ip in w.workload_ips or ()),
        hostname=w.hostname or "",
        network=w.network or "",
        protocol=_opt_enum(
            _child(path, "protocol"), InboundProtocol, w.protocol, InboundProtocol.TCP
        ),
        trust_domain=w.trust_domain or DEFAULT_TRUST_DOMAIN,
        service_account=w.service_account or DEFAULT_SERVICE_ACCOUNT,
        waypoint=_gateway(_child(path, "waypoint"), w.waypoint) if w.waypoint else None,
        network_gateway=_gateway(_child(path, "networkGateway"), w.network_gateway)
        if w.network_gateway
        else None,
        node=w.node or "",
        canonical_name=w.canonical_name or "",
        canonical_revision=w.canonical_revision or "",
        workload_type=w.workload_type or DEFAULT_WORKLOAD_TYPE,
        workload_name=w.workload_name or "",
        native_tunnel=bool(w.native_tunnel),
        application_tunnel=tunnel,
        services=frozen_map(services),
        authorization_policies=tuple(w.authorization_policies or ()),
        status=_opt_enum(_child(path, "status"), HealthStatus, w.status, HealthStatus.HEALTHY),
        cluster_id=w.cluster_id or cluster_id,
        locality=Locality(region=loc.region or "", zone=loc.zone or "", subzone=loc.subzone or "")
        if loc is not None
        else Locality(),
        network_mode=_opt_enum(
            _child(path, "networkMode"), NetworkMode, w.network_mode, NetworkMode.STANDARD
        ),
        capacity=int(w.capacity) if w.capacity is not None else 1,
    )


def build_service(path: str, s: ServiceSpec) -> Service:
    for key, value in (("name", s.name), ("namespace", s.namespace), ("hostname", s.hostname)):
        if not value:
            raise _fail(_child(path, key), "must not be empty")
    load_balancer = None
    if s.load_balancer is not None:
        lb, where = s.load_balancer, _child(path, "loadBalancer")
        load_balancer = LoadBalancer(
            routing_preferences=tuple(
                _enum(f"{where}.routingPreferences[{i}]", LoadBalancerScope, p)
                for i, p in enumerate(lb.routing_preferences or ())
            ),
            mode=_opt_enum(
                _child(where, "mode"), LoadBalancerMode, lb.mode, LoadBalancerMode.STANDARD
            ),
            health_policy=_opt_enum(
                _child(where, "healthPolicy"),
                LoadBalancerHealthPolicy,
                lb.health_policy,
                LoadBalancerHealthPolicy.ONLY_HEALTHY,
            ),
        )
    return Service(
        name=s.name,
        namespace=s.namespace,
        hostname=s.hostname,
        vips=tuple(
            _parsed(f"{path}.vips[{i}]", NetworkAddress.parse, v)
            for i, v in enumerate(s.vips or ())
        ),
        ports=_port_map(_child(path, "ports"), s.ports),
        subject_alt_names=tuple(s.subject_alt_names or ()),
        waypoint=_gateway(_child(path, "waypoint"), s.waypoint) if s.waypoint else None,
        weighted_waypoints=tuple(
            WeightedWaypoint(
                _gateway(f"{path}.weightedWaypoints[{i}].destination", w.destination), w.weight
            )
            for i, w in enumerate(s.weighted_waypoints or ())
        ),
        load_balancer=load_balancer,
        ip_families=_enum(_child(path, "ipFamilies"), IpFamily, s.ip_families)
        if s.ip_families is not None
        else None,
        canonical=bool(s.canonical),
        visibility=_opt_enum(
            _child(path, "visibility"), Visibility, s.visibility, Visibility.PUBLIC
        ),
    )


def _string_match(path: str, m: str | StringMatchSpec) -> StringMatch:
    if not isinstance(m, StringMatchSpec):
        return StringMatch(StringMatchKind.EXACT, m)
    given = [
        (kind, value)
        for kind, value in (
            (StringMatchKind.EXACT, m.Exact),
            (StringMatchKind.PREFIX, m.Prefix),
            (StringMatchKind.SUFFIX, m.Suffix),
            (StringMatchKind.PRESENCE, None if m.Presence is msgspec.UNSET else ""),
        )
        if value is not None
    ]
    if len(given) != 1:
        raise _fail(path, "expected exactly one of Exact, Prefix, Suffix, Presence")
    ((kind, value),) = given
    return StringMatch(kind) if kind is StringMatchKind.PRESENCE else StringMatch(kind, value)


def _build_match(path: str, spec: MatchSpec) -> Match:
    def entry(kind: MatchList, where: str, value: Any) -> Any:
        if kind is MatchList.STRING:
            return _string_match(where, value)
        if kind is MatchList.SERVICE_ACCOUNT:
            return ServiceAccountMatch(value.namespace, value.service_account)
        if kind is MatchList.IP:
            return ipaddress.ip_network(value, strict=False)
        return int(value)

    return Match(
        **{
            attr: tuple(
                entry(kind, f"{path}.{key}[{i}]", v)
                for i, v in enumerate(getattr(spec, attr) or ())
            )
            for attr, key, kind in MATCH_LISTS
        }
    )


def build_policy(path: str, p: PolicySpec) -> Authorization:
    for key, value in (("name", p.name), ("namespace", p.namespace)):
        if not value:
            raise _fail(_child(path, key), "must not be empty")
    rules = tuple(
        tuple(
            tuple(
                _build_match(f"{path}.rules[{r}][{c}][{m}]", match)
                for m, match in enumerate(clause)
            )
            for c, clause in enumerate(rule)
        )
        for r, rule in enumerate(p.rules or ())
    )
    return Authorization(
        name=p.name,
        namespace=p.namespace,
        scope=_opt_enum(_child(path, "scope"), Scope, p.scope, Scope.NAMESPACE),
        action=_opt_enum(_child(path, "action"), Action, p.action, Action.ALLOW),
        rules=rules,
        dry_run=bool(p.dry_run),
    )


def parse_local_config(
    text: str, *, source: str = "LOCAL_XDS", cluster_id: str = DEFAULT_CLUSTER_ID
) -> UpdateBatch:
    """Parse a whole local-config document into a replacing ``UpdateBatch``."""
    return config_from_document(
        load_yaml(text, source=source), source=source, cluster_id=cluster_id
    )


def config_from_document(
    doc: Any, *, source: str = "LOCAL_XDS", cluster_id: str = DEFAULT_CLUSTER_ID
) -> UpdateBatch:
    """A loaded YAML document (mappings, lists, scalars) as a replacing ``UpdateBatch``."""
    try:
        try:
            spec = msgspec.convert(
                doc if doc is not None else {},
                LocalConfigSpec,
                strict=False,
                dec_hook=_decode_leaf,
            )
        except msgspec.ValidationError as e:
            raise _schema_error(e) from None
        workloads = tuple(
            build_workload(f"workloads[{i}]", w, cluster_id=cluster_id)
            for i, w in enumerate(spec.workloads or ())
        )
        services = tuple(
            build_service(f"services[{i}]", s) for i, s in enumerate(spec.services or ())
        )
        policies = tuple(
            build_policy(f"policies[{i}]", p) for i, p in enumerate(spec.policies or ())
        )
        _check_unique("workloads", [w.uid for w in workloads], "uid")
        _check_unique("services", [s.key for s in services], "namespace/hostname")
        _check_unique("policies", [p.key for p in policies], "namespace/name")
    except LocalConfigError as e:
        raise LocalConfigError(e.path, e.reason, source=source) from None
    return UpdateBatch(workloads=workloads, services=services, policies=policies, replace=True)


def _check_unique(section: str, keys: list[str], what: str) -> None:
    seen: dict[str, int] = {}
    for i, key in enumerate(keys):
        if key in seen:
            raise LocalConfigError(
                f"{section}[{i}]", f"duplicate {what} {key!r} (first at {section}[{seen[key]}])"
            )
        seen[key] = i


def load_local_config_file(
    path: Path, *, cluster_id: str = DEFAULT_CLUSTER_ID, max_bytes: int = MAX_FILE_BYTES
) -> UpdateBatch:
    text = read_config_file(path, max_bytes=max_bytes)
    return parse_local_config(text, source=str(path), cluster_id=cluster_id)
