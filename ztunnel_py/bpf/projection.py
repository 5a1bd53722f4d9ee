"""The desired content of every reconciled BPF map, from mesh state and enrolled pods. Pure.

``project(state, pods)`` returns ``{map name: {key bytes: value bytes}}`` for the maps
ztunnel-py owns (``zt_dst``, ``zt_dst_cidr``, ``zt_local``, ``zt_deny``, ``zt_pods``); the
layouts are ``bpf/include/zt_maps.h`` through the generated ``_types``. ``reconcile`` diffs
this against what it applied last.

Which destinations are "mesh" (captured by connect4/6 and sent to the pod's :15001)
-------------------------------------------------------------------------------------
ztunnel in iptables mode captures every outbound TCP connection of an enrolled pod. In eBPF
mode the point is that traffic which needs no proxy never leaves the kernel, so a destination is
captured exactly when ztunnel would do more than a plain TCP passthrough for it:

* a **workload IP** on the node's network (``network``), of a workload that is not
  host-network and that needs the proxy: it speaks HBONE (``protocol=HBONE`` or native
  tunnel), or has a waypoint, or is reached through a network gateway. All ports.
* a **service VIP** on the node's network, for each of the service's ports (every port when
  the service lists none), when the service has a waypoint, or at least one of its endpoints
  is a workload that needs the proxy or sits on another network (gateway needed).
* a **service CIDR VIP** under the same rule, in the ``zt_dst_cidr`` trie: an address no
  ``zt_dst`` entry names is captured when such a prefix contains it. The kernel does not rank
  prefixes: which service serves the address (longest prefix, client's namespace first) is the
  proxy's choice, and a plain service there is passed through by the proxy as ztunnel would.

Everything else passes untouched: unknown addresses, plain-TCP workloads, services whose
endpoints are all plain TCP on this network (kube-proxy or the CNI balances them in the kernel
as before), and VIPs or IPs of other networks (the proxy would not find them on this network
either). A connection to such a destination is what ztunnel would have passed through as
plain TCP; only its istio_tcp_* telemetry is lost.

Per pod: its own addresses (``zt_local``) stay local, as istio-cni's ``-o lo -j ACCEPT``; its
workload's kernel-enforceable DENY rules (source CIDR and/or destination port only, compiled
exactly by ``rbac.kernel``; what it cannot represent stays with the proxy) go to ``zt_deny``;
its ``zt_pods`` entry switches capture on.
"""

from __future__ import annotations

import ctypes
import ipaddress
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from ztunnel_py.bpf import _types as t
from ztunnel_py.ip import IPNetwork
from ztunnel_py.rbac.kernel import KernelDenyRule, compile_kernel_denies
from ztunnel_py.state.model import (
    InboundProtocol,
    IPAddress,
    NetworkMode,
    Service,
    Workload,
)
from ztunnel_py.state.store import ProxyState

DesiredMaps = dict[str, dict[bytes, bytes]]

# The maps the reconciler owns, children first; zt_pods (the parent) is applied last on add and
# first on delete.
CHILD_MAPS = (t.MAP_DST, t.MAP_DST_CIDR, t.MAP_LOCAL, t.MAP_DENY)
PARENT_MAP = t.MAP_PODS
RECONCILED_MAPS = (*CHILD_MAPS, PARENT_MAP)
# The maps whose entries belong to one pod (their keys start from its netns cookie).
POD_MAPS = (t.MAP_LOCAL, t.MAP_DENY, t.MAP_PODS)

POD_FLAGS = t.ZT_POD_CAPTURE_OUTBOUND | t.ZT_POD_CAPTURE_INBOUND
_DENY_PREFIX_BASE = 80  # netns cookie (64 bits) + port (16 bits)


@dataclass(frozen=True, slots=True)
class EnrolledPod:
    """A pod whose netns the daemon has enrolled: what the maps need to know about it."""

    uid: str
    netns_cookie: int
    ips: tuple[IPAddress, ...] = ()
    workload_uid: str | None = None


DenyCompiler = Callable[[ProxyState, Workload], Iterable[KernelDenyRule]]


def kernel_deny_rules(state: ProxyState, workload: Workload) -> tuple[KernelDenyRule, ...]:
    """The default compiler: ``rbac.kernel``'s exact plaintext DENY subset for the workload."""
    policies = state.policies_for(workload)
    return compile_kernel_denies(policies, workload_ips=workload.workload_ips).rules


def project(
    state: ProxyState,
    pods: Iterable[EnrolledPod],
    *,
    network: str = "",
    compile_deny: DenyCompiler | None = kernel_deny_rules,
    destinations: dict[bytes, bytes] | None = None,
    cidr_destinations: dict[bytes, bytes] | None = None,
) -> DesiredMaps:
    """The desired map contents. ``compile_deny=None`` puts no DENY rule in the kernel (the
    proxy still enforces every policy; the kernel rules only drop earlier). ``destinations``
    and ``cidr_destinations``: ``mesh_destinations`` and ``mesh_cidr_destinations`` computed
    already (they depend on the state only, not on the pods)."""
    if destinations is None:
        destinations = mesh_destinations(state, network=network)
    if cidr_destinations is None:
        cidr_destinations = mesh_cidr_destinations(state, network=network)
    desired: DesiredMaps = {
        t.MAP_DST: destinations,
        t.MAP_DST_CIDR: cidr_destinations,
        t.MAP_LOCAL: {},
        t.MAP_DENY: {},
        t.MAP_PODS: {},
    }
    for pod in pods:
        for ip in pod.ips:
            if kernel_visible(ip):
                desired[t.MAP_LOCAL][local_key(pod.netns_cookie, ip)] = _LOCAL_VALUE
        if compile_deny is not None and pod.workload_uid is not None:
            workload = state.workload(pod.workload_uid)
            if workload is not None:
                for rule in compile_deny(state, workload):
                    key = deny_key(pod.netns_cookie, rule.src, rule.dst_port)
                    if key is not None:
                        desired[t.MAP_DENY][key] = _DENY_VALUE
        desired[t.MAP_PODS][pod_key(pod.netns_cookie)] = pod_value(POD_FLAGS)
    return desired


# ----------------------------------------------------------------------------- mesh decisions


def workload_needs_proxy(workload: Workload) -> bool:
    return (
        workload.protocol is InboundProtocol.HBONE
        # hostname only (ServiceEntry resolution: DNS): the proxy looks the address up
        or (not workload.workload_ips and bool(workload.hostname))
        or workload.native_tunnel
        or workload.waypoint is not None
        or workload.network_gateway is not None
    )


def service_needs_proxy(state: ProxyState, service: Service, *, network: str = "") -> bool:
    if service.waypoint is not None:
        return True
    for endpoint in state.endpoints(service.key).values():
        workload = state.workload(endpoint.workload_uid)
        if workload is None:
            continue
        if workload_needs_proxy(workload) or workload.network != network:
            return True
    return False


def _captured_ports(service: Service) -> list[int]:
    return sorted(p for p in service.ports if 0 < p < 65536) or [0]


def mesh_cidr_destinations(state: ProxyState, *, network: str = "") -> dict[bytes, bytes]:
    """``zt_dst_cidr``: the CIDR VIPs of the services that need the proxy, per port."""
    entries: dict[bytes, bytes] = {}
    for service in state.services():
        cidrs = [c for c in service.cidr_vips if c.network == network and kernel_visible(c.prefix)]
        if not cidrs or not service_needs_proxy(state, service, network=network):
            continue
        for cidr in cidrs:
            for port in _captured_ports(service):
                entries[dst_cidr_key(cidr.prefix, port)] = _SERVICE_VALUE
    return entries


def mesh_destinations(state: ProxyState, *, network: str = "") -> dict[bytes, bytes]:
    entries: dict[bytes, bytes] = {}
    for service in state.services():
        if not service_needs_proxy(state, service, network=network):
            continue
        ports = _captured_ports(service)
        for vip in service.vips:
            if vip.network != network or not kernel_visible(vip.address):
                continue
            for port in ports:
                entries[dst_key(vip.address, port)] = _SERVICE_VALUE
    # Workload IPs after services: where a VIP is also a workload IP the port-0 entry is the
    # workload's (ztunnel resolves a workload address before a service VIP).
    for workload in state.workloads():
        if workload.network_mode is NetworkMode.HOST_NETWORK or workload.network != network:
            continue
        if workload_needs_proxy(workload):
            for ip in workload.workload_ips:
                if kernel_visible(ip):
                    entries[dst_key(ip, 0)] = _WORKLOAD_VALUE
    return entries


_IPV4_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")


def kernel_visible(address: IPAddress | IPNetwork) -> bool:
    """False for an IPv4-mapped IPv6 address or prefix (``::ffff:a.b.c.d``) from xDS or local
    config. ztunnel keeps such an address as IPv6 but looks connections up by their canonical
    address, so it never matches one; in the 16-byte layout it would read as the IPv4 address
    itself and capture (or call local) traffic ztunnel treats as unknown."""
    if isinstance(address, ipaddress.IPv6Address):
        return address.ipv4_mapped is None
    if isinstance(address, ipaddress.IPv6Network):
        return not address.subnet_of(_IPV4_MAPPED)
    return True


# ----------------------------------------------------------------------------- encodings


def addr16(ip: IPAddress) -> bytes:
    """16 bytes, network order; IPv4 as ``::ffff:a.b.c.d`` (the layout of every addr field)."""
    if ip.version == 4:
        return b"\0" * 10 + b"\xff\xff" + ip.packed
    return ip.packed


def from_addr16(raw: bytes) -> IPAddress:
    ip = ipaddress.IPv6Address(raw)
    return ip.ipv4_mapped or ip


def be16(port: int) -> int:
    """The native-int value whose memory is ``port`` in network order (for u16 fields)."""
    return int.from_bytes(port.to_bytes(2, "big"), sys.byteorder)


def from_be16(value: int) -> int:
    return int.from_bytes(value.to_bytes(2, sys.byteorder), "big")


def fill(field: ctypes.Array[ctypes.c_uint8], data: bytes) -> None:
    """Copy ``data`` into the start of a ``__u8[]`` field."""
    if len(data) > len(field):
        raise ValueError(f"{len(data)} bytes do not fit a {len(field)}-byte field")
    ctypes.memmove(field, data, len(data))


def pod_key(netns_cookie: int) -> bytes:
    return bytes(t.ZtPodKey(netns_cookie=netns_cookie))


def pod_value(flags: int) -> bytes:
    return bytes(t.ZtPod(flags=flags))


def dst_key(ip: IPAddress, port: int) -> bytes:
    key = t.ZtDstKey(port=be16(port))
    fill(key.addr, addr16(ip))
    return bytes(key)


_DST_CIDR_PORT_BITS = 16
_IPV4_MAPPED_BITS = 96  # ::ffff: before an IPv4 address in the 16-byte layout


def dst_cidr_key(prefix: IPNetwork, port: int) -> bytes:
    """The ``zt_dst_cidr`` trie key of a prefix on one port (0 = every port)."""
    key = t.ZtDstCidrKey(port=be16(port))
    fill(key.addr, addr16(prefix.network_address))
    mapped = _IPV4_MAPPED_BITS if prefix.version == 4 else 0
    key.prefixlen = _DST_CIDR_PORT_BITS + mapped + prefix.prefixlen
    return bytes(key)


def local_key(netns_cookie: int, ip: IPAddress) -> bytes:
    key = t.ZtLocalKey(netns_cookie=netns_cookie)
    fill(key.addr, addr16(ip))
    return bytes(key)


def key_cookie(map_name: str, key: bytes) -> int:
    """The netns cookie of the pod a ``POD_MAPS`` entry belongs to."""
    if map_name == t.MAP_PODS:
        return int(t.ZtPodKey.from_buffer_copy(key).netns_cookie)
    if map_name == t.MAP_LOCAL:
        return int(t.ZtLocalKey.from_buffer_copy(key).netns_cookie)
    if map_name == t.MAP_DENY:
        deny = t.ZtDenyKey.from_buffer_copy(key)
        return int(deny.netns_cookie_lo) | int(deny.netns_cookie_hi) << 32
    raise ValueError(f"{map_name} is not keyed by pod")


def deny_key(netns_cookie: int, src: IPNetwork | None, dst_port: int | None) -> bytes | None:
    """The trie key of one rule; ``None`` for a rule that can never match (port 0)."""
    if dst_port is not None and not 0 < dst_port < 65536:
        if dst_port == 0:
            return None  # no TCP connection goes to port 0
        raise ValueError(f"kernel DENY rule with destination port {dst_port}")
    key = t.ZtDenyKey(
        prefixlen=_DENY_PREFIX_BASE,
        netns_cookie_lo=netns_cookie & 0xFFFFFFFF,
        netns_cookie_hi=netns_cookie >> 32,
        port=be16(dst_port or 0),
    )
    if src is not None:
        key.prefixlen = _DENY_PREFIX_BASE + 8 + src.prefixlen
        key.family = t.ZT_AF_INET if src.version == 4 else t.ZT_AF_INET6
        packed = src.network_address.packed
        fill(key.addr, packed)
    return bytes(key)


_SERVICE_VALUE = bytes(t.ZtDst(kind=t.ZT_DST_SERVICE))
_WORKLOAD_VALUE = bytes(t.ZtDst(kind=t.ZT_DST_WORKLOAD))
_LOCAL_VALUE = bytes(t.ZtLocal(reserved=0))
_DENY_VALUE = bytes(t.ZtDeny(action=t.ZT_DENY_DROP))
