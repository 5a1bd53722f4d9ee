"""``/config_dump`` in ztunnel's JSON shape, from plain state. Pure and deterministic.

``istioctl ztunnel-config`` reads this document, so the keys are ztunnel's (camelCase, lists
sorted by key, defaults left out where ztunnel leaves them out). The same shapes are what the
local-config YAML uses, so a dumped workload, service or policy can be pasted into a
``LOCAL_XDS_PATH`` file.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from ztunnel_py.rbac.model import (
    MATCH_LISTS,
    Authorization,
    Match,
    MatchList,
    ServiceAccountMatch,
    StringMatch,
    StringMatchKind,
)
from ztunnel_py.state.model import (
    GatewayAddress,
    HealthStatus,
    Locality,
    Service,
    Workload,
)
from ztunnel_py.state.store import ProxyState

JSON = dict[str, Any]


def gateway_to_dict(gw: GatewayAddress) -> JSON:
    return {"destination": str(gw.destination), "hboneMtlsPort": gw.hbone_mtls_port}


def _ports(ports: Mapping[int, int]) -> dict[str, int]:
    return {str(k): v for k, v in sorted(ports.items())}


def workload_to_dict(w: Workload) -> JSON:
    out: JSON = {
        "workloadIps": [str(ip) for ip in w.workload_ips],
        "protocol": w.protocol.value,
        "networkMode": w.network_mode.value,
        "uid": w.uid,
        "name": w.name,
        "namespace": w.namespace,
        "trustDomain": w.trust_domain,
        "serviceAccount": w.service_account,
        "network": w.network,
        "workloadName": w.workload_name,
        "workloadType": w.workload_type,
        "canonicalName": w.canonical_name,
        "canonicalRevision": w.canonical_revision,
        "hostname": w.hostname,
        "node": w.node,
        "nativeTunnel": w.native_tunnel,
        "authorizationPolicies": list(w.authorization_policies),
        "status": w.status.value,
        "clusterId": w.cluster_id,
        "services": sorted(w.services),
        "capacity": w.capacity,
    }
    if w.waypoint is not None:
        out["waypoint"] = gateway_to_dict(w.waypoint)
    if w.network_gateway is not None:
        out["networkGateway"] = gateway_to_dict(w.network_gateway)
    if w.application_tunnel is not None:
        out["applicationTunnel"] = {
            "protocol": w.application_tunnel.protocol.value,
            "port": w.application_tunnel.port,
        }
    if w.locality != Locality():
        out["locality"] = {
            "region": w.locality.region,
            "zone": w.locality.zone,
            "subzone": w.locality.subzone,
        }
    # ztunnel omits empty/default optional fields; keep the keys istioctl always reads.
    always = {"workloadIps", "protocol", "networkMode", "uid", "name", "namespace", "status"}
    always |= {"clusterId", "capacity", "serviceAccount", "trustDomain", "node", "services"}
    return {k: v for k, v in out.items() if k in always or v not in ("", False, [], None)}


def service_to_dict(s: Service, state: ProxyState) -> JSON:
    endpoints: JSON = {}
    for uid, ep in sorted(state.endpoints(s.key).items()):
        wl = state.workload(uid)
        status = wl.status if wl is not None else HealthStatus.HEALTHY
        endpoints[uid] = {
            "workloadUid": uid,
            "port": _ports(ep.ports),
            "status": status.value,
        }
    out: JSON = {
        "name": s.name,
        "namespace": s.namespace,
        "hostname": s.hostname,
        "vips": [str(v) for v in s.vips],
        "ports": _ports(s.ports),
        "endpoints": endpoints,
        "subjectAltNames": list(s.subject_alt_names),
        "canonical": s.canonical,
        "visibility": s.visibility.value,
    }
    if s.waypoint is not None:
        out["waypoint"] = gateway_to_dict(s.waypoint)
    if s.weighted_waypoints:
        out["weightedWaypoints"] = [
            {"destination": gateway_to_dict(w.destination), "weight": w.weight}
            for w in s.weighted_waypoints
        ]
    if s.load_balancer is not None:
        out["loadBalancer"] = {
            "routingPreferences": [p.value for p in s.load_balancer.routing_preferences],
            "mode": s.load_balancer.mode.value,
            "healthPolicy": s.load_balancer.health_policy.value,
        }
    if s.ip_families is not None:
        out["ipFamilies"] = s.ip_families.value
    if s.cidr_vips:
        out["cidrVips"] = [str(v) for v in s.cidr_vips]
    return out


def _string_match(m: StringMatch) -> JSON:
    if m.kind is StringMatchKind.PRESENCE:
        return {"Presence": []}
    return {m.kind.value: m.value}


def _sa(m: ServiceAccountMatch) -> JSON:
    return {"namespace": m.namespace, "serviceAccount": m.service_account}


_RENDER_MATCH: dict[MatchList, Callable[[Any], Any]] = {
    MatchList.STRING: _string_match,
    MatchList.SERVICE_ACCOUNT: _sa,
    MatchList.IP: str,
    MatchList.PORT: int,
}


def match_to_dict(m: Match) -> JSON:
    out: JSON = {}
    for attr, key, kind in MATCH_LISTS:
        values = getattr(m, attr)
        if values:
            out[key] = [_RENDER_MATCH[kind](v) for v in values]
    return out


def policy_to_dict(p: Authorization) -> JSON:
    return {
        "name": p.name,
        "namespace": p.namespace,
        "scope": p.scope.value,
        "action": p.action.value,
        "rules": [[[match_to_dict(m) for m in clause] for clause in rule] for rule in p.rules],
        "dryRun": p.dry_run,
    }


def state_dump(state: ProxyState) -> JSON:
    """The state half of ``/config_dump``: workloads, services, policies, staged services."""
    staged: JSON = {}
    for key, eps in sorted(state.staged_services().items()):
        staged[key] = {
            uid: {"workloadUid": uid, "port": _ports(ep.ports)} for uid, ep in sorted(eps.items())
        }
    return {
        "workloads": [workload_to_dict(w) for w in sorted(state.workloads(), key=lambda w: w.uid)],
        "services": [
            service_to_dict(s, state)
            for s in sorted(state.services(), key=lambda s: (s.hostname, s.namespace))
        ],
        "policies": [policy_to_dict(p) for p in sorted(state.policies(), key=lambda p: p.key)],
        "stagedServices": staged,
    }
