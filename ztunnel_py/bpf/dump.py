"""Readable map contents for ``/config_dump``: addresses as strings, ports in host order.

``dump_maps(maps)`` turns raw entries into sorted JSON-able lists; ``describe(map, key,
value)`` decodes one entry. Attach points come from ``BpfLoader.attach_points()``.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Mapping
from typing import Any

from ztunnel_py.bpf import _types as t
from ztunnel_py.bpf.errors import BpfError
from ztunnel_py.bpf.maps import MapOps
from ztunnel_py.bpf.projection import RECONCILED_MAPS, from_addr16, from_be16

_DST_KINDS = {t.ZT_DST_WORKLOAD: "workload", t.ZT_DST_SERVICE: "service"}
_FAMILIES: dict[int, str] = {t.ZT_AF_INET: "IPv4", t.ZT_AF_INET6: "IPv6"}
_SK_STORAGE = 24  # BPF_MAP_TYPE_SK_STORAGE


def _pod_flags(flags: int) -> list[str]:
    names = []
    if flags & t.ZT_POD_CAPTURE_OUTBOUND:
        names.append("outbound")
    if flags & t.ZT_POD_CAPTURE_INBOUND:
        names.append("inbound")
    return names


def _pods(key: bytes, value: bytes) -> dict[str, Any]:
    k = t.ZtPodKey.from_buffer_copy(key)
    v = t.ZtPod.from_buffer_copy(value)
    return {"netnsCookie": k.netns_cookie, "capture": _pod_flags(v.flags)}


def _dst(key: bytes, value: bytes) -> dict[str, Any]:
    k = t.ZtDstKey.from_buffer_copy(key)
    v = t.ZtDst.from_buffer_copy(value)
    port = from_be16(k.port)
    return {
        "address": str(from_addr16(bytes(k.addr))),
        "port": port if port else "*",
        "kind": _DST_KINDS.get(v.kind, str(v.kind)),
    }


def _dst_cidr(key: bytes, value: bytes) -> dict[str, Any]:
    k = t.ZtDstCidrKey.from_buffer_copy(key)
    v = t.ZtDst.from_buffer_copy(value)
    address = from_addr16(bytes(k.addr))  # IPv4 when stored IPv4-mapped
    bits = k.prefixlen - 16 - (96 if address.version == 4 else 0)
    port = from_be16(k.port)
    return {
        "prefix": str(ipaddress.ip_network((address, bits), strict=False)),
        "port": port if port else "*",
        "kind": _DST_KINDS.get(v.kind, str(v.kind)),
    }


def _local(key: bytes, value: bytes) -> dict[str, Any]:
    k = t.ZtLocalKey.from_buffer_copy(key)
    return {"netnsCookie": k.netns_cookie, "address": str(from_addr16(bytes(k.addr)))}


def _orig_src(key: bytes, value: bytes) -> dict[str, Any]:
    k = t.ZtOrigSrcKey.from_buffer_copy(key)
    address = str(from_addr16(bytes(k.addr)))
    return {"netnsCookie": k.netns_cookie, "source": f"{address}:{from_be16(k.port)}"}


def _deny(key: bytes, value: bytes) -> dict[str, Any]:
    k = t.ZtDenyKey.from_buffer_copy(key)
    port = from_be16(k.port)
    source = "*"
    if k.prefixlen > 80:
        size = 4 if k.family == t.ZT_AF_INET else 16
        net = ipaddress.ip_network((bytes(k.addr)[:size], k.prefixlen - 88))
        source = str(net)
    return {
        "netnsCookie": k.netns_cookie_lo | (k.netns_cookie_hi << 32),
        "source": source,
        "port": port if port else "*",
    }


def _orig(key: bytes, value: bytes) -> dict[str, Any]:
    k = t.ZtOrigKey.from_buffer_copy(key)
    v = t.ZtOrig.from_buffer_copy(value)
    return {
        "netnsCookie": k.netns_cookie,
        "sourcePort": from_be16(k.port),
        "family": _FAMILIES.get(k.family, str(k.family)),
        "destination": f"{from_addr16(bytes(v.addr))}:{from_be16(v.port)}",
        "kind": _DST_KINDS.get(v.kind, str(v.kind)),
    }


def _inbound(key: bytes, value: bytes) -> dict[str, Any]:
    return {
        "netnsCookie": t.ZtPodKey.from_buffer_copy(key).netns_cookie,
        "socketCookie": int.from_bytes(value, "little"),
    }


DECODERS: dict[str, Callable[[bytes, bytes], dict[str, Any]]] = {
    t.MAP_PODS: _pods,
    t.MAP_DST: _dst,
    t.MAP_DST_CIDR: _dst_cidr,
    t.MAP_LOCAL: _local,
    t.MAP_ORIG_SRC: _orig_src,
    t.MAP_DENY: _deny,
    t.MAP_ORIG_DST: _orig,
    t.MAP_INBOUND_SK: _inbound,
}


def describe(map_name: str, key: bytes, value: bytes) -> dict[str, Any]:
    decode = DECODERS.get(map_name)
    if decode is None:
        return {"key": key.hex(), "value": value.hex()}
    return decode(key, value)


def dump_maps(
    maps: Mapping[str, MapOps], names: tuple[str, ...] = (*RECONCILED_MAPS, t.MAP_INBOUND_SK)
) -> dict[str, list[dict[str, Any]]]:
    """Decoded entries of the named maps, sorted for stable output."""
    out: dict[str, list[dict[str, Any]]] = {}
    for name in names:
        if name not in maps:
            continue
        entries = [describe(name, k, v) for k, v in maps[name].items()]
        out[name] = sorted(entries, key=lambda e: sorted((k, str(v)) for k, v in e.items()))
    return out


def dump_every_map(maps: Mapping[str, MapOps]) -> dict[str, Any]:
    """Every map the daemon holds, decoded where we know the layout, hex otherwise. A map the
    kernel will not walk (per-socket storage) or that fails to read says so instead."""
    out: dict[str, Any] = {}
    for name in sorted(maps):
        if name == t.MAP_COUNTERS:
            continue  # per-CPU: read through BpfLoader.read_counters (summed, by name)
        spec = t.MAP_SPECS.get(name)
        if spec is not None and spec.map_type == _SK_STORAGE:
            out[name] = {"note": "per-socket storage: the kernel does not list its entries"}
            continue
        try:
            entries = [describe(name, k, v) for k, v in maps[name].items()]
        except (BpfError, OSError) as e:
            out[name] = {"error": str(e)}
            continue
        out[name] = sorted(entries, key=lambda e: sorted((k, str(v)) for k, v in e.items()))
    return out
