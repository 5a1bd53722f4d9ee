"""ztunnel's local-config YAML (``LOCAL_XDS_PATH`` / ``LOCAL_XDS``) into an ``UpdateBatch``.

The format is ztunnel's ``LocalConfig``: top-level ``workloads``, ``policies`` and ``services``
(all optional), camelCase keys matching ``/config_dump``, and unknown fields refused, so a file
written for ztunnel loads here unchanged and a typo is caught. Every error names the path of the
offending field, e.g. ``workloads[1].workloadIps[0]: '10.0.0.300' is not an IP address``.
"""

from __future__ import annotations

import enum
import ipaddress
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml

from ztunnel_py.errors import LocalConfigError
from ztunnel_py.ip import IPNetwork
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
    Workload,
    frozen_map,
)
from ztunnel_py.state.store import UpdateBatch

_T = TypeVar("_T")
_E = TypeVar("_E", bound=enum.Enum)


class _Node:
    """A YAML value plus the path that led to it, so every error can say where it is."""

    __slots__ = ("path", "value")

    def __init__(self, value: Any, path: str) -> None:
        self.value = value
        self.path = path

    def fail(self, reason: str) -> LocalConfigError:
        return LocalConfigError(self.path or "<document>", reason)

    def mapping(self, allowed: set[str], required: set[str] = frozenset()) -> dict[str, _Node]:  # type: ignore[assignment]
        if not isinstance(self.value, dict):
            raise self.fail(f"expected a mapping, got {_kind(self.value)}")
        out: dict[str, _Node] = {}
        for key, value in self.value.items():
            if not isinstance(key, str):
                raise self.fail(f"keys must be strings, got {key!r}")
            if key not in allowed:
                hint = _closest(key, allowed)
                raise _Node(value, self._child(key)).fail(
                    "unknown field" + (f" (did you mean {hint!r}?)" if hint else "")
                )
            out[key] = _Node(value, self._child(key))
        for key in sorted(required - out.keys()):
            raise _Node(None, self._child(key)).fail("missing required field")
        return out

    def items(self) -> list[_Node]:
        if self.value is None:
            return []
        if not isinstance(self.value, list):
            raise self.fail(f"expected a list, got {_kind(self.value)}")
        return [_Node(v, f"{self.path}[{i}]") for i, v in enumerate(self.value)]

    def entries(self) -> list[tuple[Any, _Node]]:
        if self.value is None:
            return []
        if not isinstance(self.value, dict):
            raise self.fail(f"expected a mapping, got {_kind(self.value)}")
        return [(k, _Node(v, self._child(str(k)))) for k, v in self.value.items()]

    def string(self) -> str:
        if self.value is None:
            return ""
        if isinstance(self.value, bool) or not isinstance(self.value, str | int | float):
            raise self.fail(f"expected a string, got {_kind(self.value)}")
        return str(self.value)

    def boolean(self) -> bool:
        if self.value is None:
            return False
        if not isinstance(self.value, bool):
            raise self.fail(f"expected true or false, got {self.value!r}")
        return self.value

    def integer(self, *, minimum: int = 0, maximum: int = 2**32 - 1) -> int:
        value = self.value
        if isinstance(value, str) and value.strip().isdigit():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(f"expected an integer, got {_kind(self.value)}")
        if not minimum <= value <= maximum:
            raise self.fail(f"{value} is out of range {minimum}..{maximum}")
        return value

    def port(self) -> int:
        return self.integer(minimum=0, maximum=65535)

    def enum(self, kind: type[_E]) -> _E:
        text = self.string()
        folded = text.replace("_", "").lower()
        for member in kind:
            names = {
                str(member.value).replace("_", "").lower(),
                member.name.replace("_", "").lower(),
            }
            if folded in names:
                return member
        allowed = ", ".join(str(m.value) for m in kind)
        raise self.fail(f"{text!r} is not one of {allowed}")

    def ip(self) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
        try:
            return ipaddress.ip_address(self.string())
        except ValueError:
            raise self.fail(f"{self.value!r} is not an IP address") from None

    def cidr(self) -> IPNetwork:
        text = self.string()
        try:
            return ipaddress.ip_network(text, strict=False)
        except ValueError:
            raise self.fail(f"{text!r} is not an IP address or CIDR") from None

    def parsed(self, parse: Callable[[str], _T]) -> _T:
        try:
            return parse(self.string())
        except ValueError as e:
            raise self.fail(str(e)) from None

    def _child(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key


def _kind(value: Any) -> str:
    if value is None:
        return "nothing"
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean"}.get(
        type(value), type(value).__name__
    )


def _closest(key: str, allowed: set[str]) -> str | None:
    import difflib

    matches = difflib.get_close_matches(key, sorted(allowed), n=1, cutoff=0.7)
    return matches[0] if matches else None


# ---------------------------------------------------------------------------------------------

_WORKLOAD_FIELDS = {
    "uid", "name", "namespace", "workloadIps", "hostname", "network", "protocol", "trustDomain",
    "serviceAccount", "waypoint", "networkGateway", "node", "canonicalName", "canonicalRevision",
    "workloadType", "workloadName", "nativeTunnel", "applicationTunnel", "services",
    "authorizationPolicies", "status", "clusterId", "locality", "networkMode", "capacity",
}  # fmt: skip
_SERVICE_FIELDS = {
    "name", "namespace", "hostname", "vips", "cidrVips", "ports", "endpoints", "subjectAltNames",
    "waypoint", "weightedWaypoints", "loadBalancer", "ipFamilies", "canonical", "visibility",
}  # fmt: skip
_POLICY_FIELDS = {"name", "namespace", "scope", "action", "rules", "dryRun"}
_MATCH_FIELDS = {key for _, key, _ in MATCH_LISTS}


def _gateway(node: _Node) -> GatewayAddress:
    fields = node.mapping({"destination", "hboneMtlsPort"}, {"destination"})
    dest = fields["destination"]
    destination: NetworkAddress | NamespacedHostname
    if isinstance(dest.value, dict):  # the {network, address} / {namespace, hostname} spelling
        parts = dest.mapping({"network", "address", "namespace", "hostname"})
        if "address" in parts:
            destination = NetworkAddress(
                parts.get("network", _Node("", "")).string(), parts["address"].ip()
            )
        elif "hostname" in parts and "namespace" in parts:
            destination = NamespacedHostname(
                parts["namespace"].string(), parts["hostname"].string()
            )
        else:
            raise dest.fail("expected {network, address} or {namespace, hostname}")
    else:
        text = dest.string()
        try:
            destination = NetworkAddress.parse(text)
        except ValueError:
            destination = dest.parsed(NamespacedHostname.parse)
    port = fields["hboneMtlsPort"].port() if "hboneMtlsPort" in fields else 15008
    return GatewayAddress(destination=destination, hbone_mtls_port=port)


def _port_map(node: _Node) -> Mapping[int, int]:
    ports: dict[int, int] = {}
    for key, value in node.entries():
        port = _Node(key, value.path).port()
        ports[port] = value.port()
    return frozen_map(ports)


def parse_workload(node: _Node, *, cluster_id: str = DEFAULT_CLUSTER_ID) -> Workload:
    f = node.mapping(_WORKLOAD_FIELDS, {"namespace"})
    namespace = f["namespace"].string()
    name = f["name"].string() if "name" in f else ""
    if not namespace:
        raise f["namespace"].fail("must not be empty")
    ips = tuple(n.ip() for n in f["workloadIps"].items()) if "workloadIps" in f else ()
    hostname = f["hostname"].string() if "hostname" in f else ""
    uid = f["uid"].string() if "uid" in f else ""
    if not uid:
        if not name:
            raise node.fail("a workload needs a uid or a name")
        uid = f"{cluster_id}//v1/Pod/{namespace}/{name}"
    services: dict[str, Mapping[int, int]] = {}
    if "services" in f:
        for key, value in f["services"].entries():
            _Node(key, value.path).parsed(NamespacedHostname.parse)
            services[str(key)] = _port_map(value)
    app_tunnel = None
    if "applicationTunnel" in f and f["applicationTunnel"].value is not None:
        at = f["applicationTunnel"].mapping({"protocol", "port"})
        app_tunnel = ApplicationTunnel(
            protocol=at["protocol"].enum(AppTunnelProtocol)
            if "protocol" in at
            else AppTunnelProtocol.NONE,
            port=at["port"].port() if "port" in at and at["port"].value is not None else None,
        )
    locality = Locality()
    if "locality" in f and f["locality"].value is not None:
        loc = f["locality"].mapping({"region", "zone", "subzone"})
        locality = Locality(**{k: v.string() for k, v in loc.items()})

    def opt(key: str, read: Callable[[_Node], _T], default: _T) -> _T:
        return read(f[key]) if key in f and f[key].value is not None else default

    return Workload(
        uid=uid,
        name=name,
        namespace=namespace,
        workload_ips=ips,
        hostname=hostname,
        network=opt("network", _Node.string, ""),
        protocol=opt("protocol", lambda n: n.enum(InboundProtocol), InboundProtocol.TCP),
        trust_domain=opt("trustDomain", _Node.string, "") or DEFAULT_TRUST_DOMAIN,
        service_account=opt("serviceAccount", _Node.string, "") or DEFAULT_SERVICE_ACCOUNT,
        waypoint=opt("waypoint", _gateway, None),
        network_gateway=opt("networkGateway", _gateway, None),
        node=opt("node", _Node.string, ""),
        canonical_name=opt("canonicalName", _Node.string, ""),
        canonical_revision=opt("canonicalRevision", _Node.string, ""),
        workload_type=opt("workloadType", _Node.string, "") or DEFAULT_WORKLOAD_TYPE,
        workload_name=opt("workloadName", _Node.string, ""),
        native_tunnel=opt("nativeTunnel", _Node.boolean, False),
        application_tunnel=app_tunnel,
        services=frozen_map(services),
        authorization_policies=tuple(n.string() for n in f["authorizationPolicies"].items())
        if "authorizationPolicies" in f
        else (),
        status=opt("status", lambda n: n.enum(HealthStatus), HealthStatus.HEALTHY),
        cluster_id=opt("clusterId", _Node.string, "") or cluster_id,
        locality=locality,
        network_mode=opt("networkMode", lambda n: n.enum(NetworkMode), NetworkMode.STANDARD),
        capacity=opt("capacity", lambda n: n.integer(minimum=0), 1),
    )


def parse_service(node: _Node) -> Service:
    f = node.mapping(_SERVICE_FIELDS, {"name", "namespace", "hostname"})
    for key in ("name", "namespace", "hostname"):
        if not f[key].string():
            raise f[key].fail("must not be empty")
    vips = tuple(n.parsed(NetworkAddress.parse) for n in f["vips"].items()) if "vips" in f else ()
    load_balancer = None
    if "loadBalancer" in f and f["loadBalancer"].value is not None:
        lb = f["loadBalancer"].mapping({"routingPreferences", "mode", "healthPolicy"})
        load_balancer = LoadBalancer(
            routing_preferences=tuple(
                n.enum(LoadBalancerScope) for n in lb["routingPreferences"].items()
            )
            if "routingPreferences" in lb
            else (),
            mode=lb["mode"].enum(LoadBalancerMode) if "mode" in lb else LoadBalancerMode.STANDARD,
            health_policy=lb["healthPolicy"].enum(LoadBalancerHealthPolicy)
            if "healthPolicy" in lb
            else LoadBalancerHealthPolicy.ONLY_HEALTHY,
        )
    return Service(
        name=f["name"].string(),
        namespace=f["namespace"].string(),
        hostname=f["hostname"].string(),
        vips=vips,
        ports=_port_map(f["ports"]) if "ports" in f else frozen_map(),
        subject_alt_names=tuple(n.string() for n in f["subjectAltNames"].items())
        if "subjectAltNames" in f
        else (),
        waypoint=_gateway(f["waypoint"])
        if "waypoint" in f and f["waypoint"].value is not None
        else None,
        load_balancer=load_balancer,
        ip_families=f["ipFamilies"].enum(IpFamily)
        if "ipFamilies" in f and f["ipFamilies"].value is not None
        else None,
        canonical=f["canonical"].boolean() if "canonical" in f else False,
        visibility=f["visibility"].enum(Visibility) if "visibility" in f else Visibility.PUBLIC,
    )


def _string_match(node: _Node) -> StringMatch:
    if isinstance(node.value, str):  # a bare string is an exact match
        return StringMatch(StringMatchKind.EXACT, node.value)
    fields = node.mapping({k.value for k in StringMatchKind})
    if len(fields) != 1:
        raise node.fail("expected exactly one of Exact, Prefix, Suffix, Presence")
    ((key, value),) = fields.items()
    kind = StringMatchKind(key)
    if kind is StringMatchKind.PRESENCE:
        return StringMatch(kind)
    return StringMatch(kind, value.string())


def _sa_match(node: _Node) -> ServiceAccountMatch:
    f = node.mapping({"namespace", "serviceAccount"}, {"namespace", "serviceAccount"})
    return ServiceAccountMatch(f["namespace"].string(), f["serviceAccount"].string())


_READ_MATCH: dict[MatchList, Callable[[_Node], Any]] = {
    MatchList.STRING: _string_match,
    MatchList.SERVICE_ACCOUNT: _sa_match,
    MatchList.IP: _Node.cidr,
    MatchList.PORT: _Node.port,
}


def _match(node: _Node) -> Match:
    f = node.mapping(_MATCH_FIELDS)
    return Match(
        **{
            attr: tuple(_READ_MATCH[kind](n) for n in f[key].items()) if key in f else ()
            for attr, key, kind in MATCH_LISTS
        }
    )


def parse_policy(node: _Node) -> Authorization:
    f = node.mapping(_POLICY_FIELDS, {"name", "namespace"})
    for key in ("name", "namespace"):
        if not f[key].string():
            raise f[key].fail("must not be empty")
    rules = tuple(
        tuple(tuple(_match(m) for m in clause.items()) for clause in rule.items())
        for rule in (f["rules"].items() if "rules" in f else [])
    )
    return Authorization(
        name=f["name"].string(),
        namespace=f["namespace"].string(),
        scope=f["scope"].enum(Scope) if "scope" in f else Scope.NAMESPACE,
        action=f["action"].enum(Action) if "action" in f else Action.ALLOW,
        rules=rules,
        dry_run=f["dryRun"].boolean() if "dryRun" in f else False,
    )


def parse_local_config(
    text: str, *, source: str = "LOCAL_XDS", cluster_id: str = DEFAULT_CLUSTER_ID
) -> UpdateBatch:
    """Parse a whole local-config document into a replacing ``UpdateBatch``."""
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = (
            f"line {mark.line + 1}, column {mark.column + 1}" if mark is not None else "<document>"
        )
        raise LocalConfigError(
            where, f"not valid YAML: {getattr(e, 'problem', e)}", source=source
        ) from None
    root = _Node(doc if doc is not None else {}, "")
    try:
        top = root.mapping({"workloads", "policies", "services"})
        workloads = (
            tuple(parse_workload(n, cluster_id=cluster_id) for n in top["workloads"].items())
            if "workloads" in top
            else ()
        )
        services = (
            tuple(parse_service(n) for n in top["services"].items()) if "services" in top else ()
        )
        policies = (
            tuple(parse_policy(n) for n in top["policies"].items()) if "policies" in top else ()
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


def load_local_config_file(path: Path, *, cluster_id: str = DEFAULT_CLUSTER_ID) -> UpdateBatch:
    try:
        text = path.read_text()
    except OSError as e:
        raise LocalConfigError("<file>", f"cannot read: {e.strerror}", source=str(path)) from None
    return parse_local_config(text, source=str(path), cluster_id=cluster_id)
