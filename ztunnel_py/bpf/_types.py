"""Map layouts, map and program names of the BPF objects. GENERATED, do not edit.

Written by tools/gen_bpf_types.py from the BTF of bpf/out/*.o and the ZT_* constants of
bpf/include/zt_maps.h and zt_splice.h. Change a header, rebuild (make -C bpf), then
rerun the tool.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

# --- constants of bpf/include/zt_maps.h and zt_splice.h

ZT_ABI_VERSION = 2
ZT_AF_INET = 2
ZT_AF_INET6 = 10
ZT_CFG_CAPTURE_UNKNOWN = 8
ZT_CFG_DNS_CAPTURE = 2
ZT_CFG_IPV4_ONLY = 4
ZT_CFG_TRANSPARENT_HBONE = 16
ZT_CFG_VALID = 1
ZT_CNT_IN_ASSIGN_FAILED = 11
ZT_CNT_IN_DROPPED_DENY = 9
ZT_CNT_IN_DROPPED_NO_LISTENER = 10
ZT_CNT_IN_HBONE_REDIRECTED = 13
ZT_CNT_IN_LOCAL_SKIPPED = 12
ZT_CNT_IN_PASSTHROUGH = 8
ZT_CNT_IN_REDIRECTED = 7
ZT_CNT_MAX = 14
ZT_CNT_ORIG_PUBLISHED = 5
ZT_CNT_ORIG_PUBLISH_FAILED = 6
ZT_CNT_OUT_LOCAL_SKIPPED = 3
ZT_CNT_OUT_ORIG_STORE_FAILED = 4
ZT_CNT_OUT_PASSTHROUGH = 1
ZT_CNT_OUT_PROXY_SKIPPED = 2
ZT_CNT_OUT_REDIRECTED = 0
ZT_DENY_DROP = 1
ZT_DST_DNS = 3
ZT_DST_ON_DEMAND = 4
ZT_DST_SERVICE = 2
ZT_DST_WORKLOAD = 1
ZT_HBONE_SPORT_MAX = 15199
ZT_HBONE_SPORT_MIN = 15100
ZT_LOOPBACK_IFINDEX = 1
ZT_MAX_CIDR_DESTINATIONS = 16384
ZT_MAX_DENY_RULES = 65536
ZT_MAX_DESTINATIONS = 131072
ZT_MAX_LOCAL_ADDRS = 32768
ZT_MAX_ORIG_DST = 131072
ZT_MAX_ORIG_SRC = 65536
ZT_MAX_PODS = 8192
ZT_ORIG_PUBLISHED = 1
ZT_POD_CAPTURE_INBOUND = 2
ZT_POD_CAPTURE_OUTBOUND = 1
ZT_PORT_DNS = 15053
ZT_PORT_DNS_SERVER = 53
ZT_PORT_HBONE = 15008
ZT_PORT_INBOUND_PLAINTEXT = 15006
ZT_PORT_OUTBOUND = 15001
ZT_SPLICE_CNT_EVENTS_LOST = 2
ZT_SPLICE_CNT_HANDED_UP = 1
ZT_SPLICE_CNT_MAX = 3
ZT_SPLICE_CNT_REDIRECTED = 0
ZT_SPLICE_EVENTS_BYTES = 65536
ZT_SPLICE_MAX_SOCKETS = 65536

# --- map keys and values


class ZtCfg(ctypes.Structure):
    """``struct zt_cfg`` (32 bytes)."""

    flags: int
    mark: int
    mark_mask: int
    probe_ip4: int
    probe_ip6: ctypes.Array[ctypes.c_uint8]

    _fields_ = [
        ("flags", ctypes.c_uint32),
        ("mark", ctypes.c_uint32),
        ("mark_mask", ctypes.c_uint32),
        ("probe_ip4", ctypes.c_uint32),
        ("probe_ip6", ctypes.c_uint8 * 16),
    ]


SIZEOF_ZT_CFG = 32


class ZtDeny(ctypes.Structure):
    """``struct zt_deny`` (4 bytes)."""

    action: int

    _fields_ = [
        ("action", ctypes.c_uint32),
    ]


SIZEOF_ZT_DENY = 4


class ZtDenyKey(ctypes.Structure):
    """``struct zt_deny_key`` (32 bytes)."""

    prefixlen: int
    netns_cookie_lo: int
    netns_cookie_hi: int
    port: int
    family: int
    addr: ctypes.Array[ctypes.c_uint8]
    pad: ctypes.Array[ctypes.c_uint8]

    _fields_ = [
        ("prefixlen", ctypes.c_uint32),
        ("netns_cookie_lo", ctypes.c_uint32),
        ("netns_cookie_hi", ctypes.c_uint32),
        ("port", ctypes.c_uint16),
        ("family", ctypes.c_uint8),
        ("addr", ctypes.c_uint8 * 16),
        ("pad", ctypes.c_uint8 * 1),
    ]


SIZEOF_ZT_DENY_KEY = 32


class ZtDst(ctypes.Structure):
    """``struct zt_dst`` (4 bytes)."""

    kind: int

    _fields_ = [
        ("kind", ctypes.c_uint32),
    ]


SIZEOF_ZT_DST = 4


class ZtDstCidrKey(ctypes.Structure):
    """``struct zt_dst_cidr_key`` (24 bytes)."""

    prefixlen: int
    port: int
    addr: ctypes.Array[ctypes.c_uint8]
    pad: ctypes.Array[ctypes.c_uint8]

    _fields_ = [
        ("prefixlen", ctypes.c_uint32),
        ("port", ctypes.c_uint16),
        ("addr", ctypes.c_uint8 * 16),
        ("pad", ctypes.c_uint8 * 2),
    ]


SIZEOF_ZT_DST_CIDR_KEY = 24


class ZtDstKey(ctypes.Structure):
    """``struct zt_dst_key`` (20 bytes)."""

    addr: ctypes.Array[ctypes.c_uint8]
    port: int
    pad: ctypes.Array[ctypes.c_uint8]

    _fields_ = [
        ("addr", ctypes.c_uint8 * 16),
        ("port", ctypes.c_uint16),
        ("pad", ctypes.c_uint8 * 2),
    ]


SIZEOF_ZT_DST_KEY = 20


class ZtLocal(ctypes.Structure):
    """``struct zt_local`` (4 bytes)."""

    reserved: int

    _fields_ = [
        ("reserved", ctypes.c_uint32),
    ]


SIZEOF_ZT_LOCAL = 4


class ZtLocalKey(ctypes.Structure):
    """``struct zt_local_key`` (24 bytes)."""

    netns_cookie: int
    addr: ctypes.Array[ctypes.c_uint8]

    _fields_ = [
        ("netns_cookie", ctypes.c_uint64),
        ("addr", ctypes.c_uint8 * 16),
    ]


SIZEOF_ZT_LOCAL_KEY = 24


class ZtOrig(ctypes.Structure):
    """``struct zt_orig`` (20 bytes)."""

    addr: ctypes.Array[ctypes.c_uint8]
    port: int
    family: int
    kind: int

    _fields_ = [
        ("addr", ctypes.c_uint8 * 16),
        ("port", ctypes.c_uint16),
        ("family", ctypes.c_uint8),
        ("kind", ctypes.c_uint8),
    ]


SIZEOF_ZT_ORIG = 20


class ZtOrigKey(ctypes.Structure):
    """``struct zt_orig_key`` (16 bytes)."""

    netns_cookie: int
    port: int
    family: int
    pad: ctypes.Array[ctypes.c_uint8]

    _fields_ = [
        ("netns_cookie", ctypes.c_uint64),
        ("port", ctypes.c_uint16),
        ("family", ctypes.c_uint8),
        ("pad", ctypes.c_uint8 * 5),
    ]


SIZEOF_ZT_ORIG_KEY = 16


class ZtOrigSrc(ctypes.Structure):
    """``struct zt_orig_src`` (4 bytes)."""

    reserved: int

    _fields_ = [
        ("reserved", ctypes.c_uint32),
    ]


SIZEOF_ZT_ORIG_SRC = 4


class ZtOrigSrcKey(ctypes.Structure):
    """``struct zt_orig_src_key`` (32 bytes)."""

    netns_cookie: int
    addr: ctypes.Array[ctypes.c_uint8]
    port: int
    pad: ctypes.Array[ctypes.c_uint8]

    _fields_ = [
        ("netns_cookie", ctypes.c_uint64),
        ("addr", ctypes.c_uint8 * 16),
        ("port", ctypes.c_uint16),
        ("pad", ctypes.c_uint8 * 6),
    ]


SIZEOF_ZT_ORIG_SRC_KEY = 32


class ZtPod(ctypes.Structure):
    """``struct zt_pod`` (8 bytes)."""

    flags: int
    pad: ctypes.Array[ctypes.c_uint8]

    _fields_ = [
        ("flags", ctypes.c_uint32),
        ("pad", ctypes.c_uint8 * 4),
    ]


SIZEOF_ZT_POD = 8


class ZtPodKey(ctypes.Structure):
    """``struct zt_pod_key`` (8 bytes)."""

    netns_cookie: int

    _fields_ = [
        ("netns_cookie", ctypes.c_uint64),
    ]


SIZEOF_ZT_POD_KEY = 8


class ZtSkOrig(ctypes.Structure):
    """``struct zt_sk_orig`` (24 bytes)."""

    addr: ctypes.Array[ctypes.c_uint8]
    port: int
    family: int
    kind: int
    published_port: int
    flags: int
    pad: ctypes.Array[ctypes.c_uint8]

    _fields_ = [
        ("addr", ctypes.c_uint8 * 16),
        ("port", ctypes.c_uint16),
        ("family", ctypes.c_uint8),
        ("kind", ctypes.c_uint8),
        ("published_port", ctypes.c_uint16),
        ("flags", ctypes.c_uint8),
        ("pad", ctypes.c_uint8 * 1),
    ]


SIZEOF_ZT_SK_ORIG = 24


class ZtSpliceConn(ctypes.Structure):
    """``struct zt_splice_conn`` (40 bytes)."""

    peer_cookie: int
    bytes: int
    passed: int
    peer_base: int
    window: int

    _fields_ = [
        ("peer_cookie", ctypes.c_uint64),
        ("bytes", ctypes.c_uint64),
        ("passed", ctypes.c_uint64),
        ("peer_base", ctypes.c_uint64),
        ("window", ctypes.c_uint64),
    ]


SIZEOF_ZT_SPLICE_CONN = 40


class ZtSpliceKey(ctypes.Structure):
    """``struct zt_splice_key`` (8 bytes)."""

    cookie: int

    _fields_ = [
        ("cookie", ctypes.c_uint64),
    ]


SIZEOF_ZT_SPLICE_KEY = 8


class ZtVersion(ctypes.Structure):
    """``struct zt_version`` (8 bytes)."""

    abi_version: int
    pad: ctypes.Array[ctypes.c_uint8]

    _fields_ = [
        ("abi_version", ctypes.c_uint32),
        ("pad", ctypes.c_uint8 * 4),
    ]


SIZEOF_ZT_VERSION = 8

STRUCTS: dict[str, type[ctypes.Structure]] = {
    "zt_cfg": ZtCfg,
    "zt_deny": ZtDeny,
    "zt_deny_key": ZtDenyKey,
    "zt_dst": ZtDst,
    "zt_dst_cidr_key": ZtDstCidrKey,
    "zt_dst_key": ZtDstKey,
    "zt_local": ZtLocal,
    "zt_local_key": ZtLocalKey,
    "zt_orig": ZtOrig,
    "zt_orig_key": ZtOrigKey,
    "zt_orig_src": ZtOrigSrc,
    "zt_orig_src_key": ZtOrigSrcKey,
    "zt_pod": ZtPod,
    "zt_pod_key": ZtPodKey,
    "zt_sk_orig": ZtSkOrig,
    "zt_splice_conn": ZtSpliceConn,
    "zt_splice_key": ZtSpliceKey,
    "zt_version": ZtVersion,
}
SIZEOF: dict[str, int] = {
    "zt_cfg": 32,
    "zt_deny": 4,
    "zt_deny_key": 32,
    "zt_dst": 4,
    "zt_dst_cidr_key": 24,
    "zt_dst_key": 20,
    "zt_local": 4,
    "zt_local_key": 24,
    "zt_orig": 20,
    "zt_orig_key": 16,
    "zt_orig_src": 4,
    "zt_orig_src_key": 32,
    "zt_pod": 8,
    "zt_pod_key": 8,
    "zt_sk_orig": 24,
    "zt_splice_conn": 40,
    "zt_splice_key": 8,
    "zt_version": 8,
}

# --- maps (pinned by name under <pin path>/maps when ``pinned``)


@dataclass(frozen=True, slots=True)
class MapSpec:
    name: str
    map_type: int  # BPF_MAP_TYPE_*
    key_type: str  # C type
    key_size: int
    value_type: str
    value_size: int
    max_entries: int
    flags: int
    pinned: bool


MAP_CFG = "zt_cfg"
MAP_COUNTERS = "zt_counters"
MAP_DENY = "zt_deny"
MAP_DST = "zt_dst"
MAP_DST_CIDR = "zt_dst_cidr"
MAP_HBONE_SK = "zt_hbone_sk"
MAP_INBOUND_SK = "zt_inbound_sk"
MAP_LOCAL = "zt_local"
MAP_ORIG_DST = "zt_orig_dst"
MAP_ORIG_SRC = "zt_orig_src"
MAP_PODS = "zt_pods"
MAP_SK_ORIG = "zt_sk_orig"
MAP_SPLICE_CONNS = "zt_splice_conns"
MAP_SPLICE_EVENT = "zt_splice_event"
MAP_SPLICE_RX = "zt_splice_rx"
MAP_SPLICE_STATS = "zt_splice_stats"
MAP_SPLICE_TX = "zt_splice_tx"
MAP_VERSION = "zt_version"

MAP_SPECS: dict[str, MapSpec] = {
    "zt_cfg": MapSpec(
        name="zt_cfg",
        map_type=2,
        key_type="__u32",
        key_size=4,
        value_type="struct zt_cfg",
        value_size=32,
        max_entries=1,
        flags=0,
        pinned=True,
    ),
    "zt_counters": MapSpec(
        name="zt_counters",
        map_type=6,
        key_type="__u32",
        key_size=4,
        value_type="__u64",
        value_size=8,
        max_entries=14,
        flags=0,
        pinned=True,
    ),
    "zt_deny": MapSpec(
        name="zt_deny",
        map_type=11,
        key_type="struct zt_deny_key",
        key_size=32,
        value_type="struct zt_deny",
        value_size=4,
        max_entries=65536,
        flags=1,
        pinned=True,
    ),
    "zt_dst": MapSpec(
        name="zt_dst",
        map_type=1,
        key_type="struct zt_dst_key",
        key_size=20,
        value_type="struct zt_dst",
        value_size=4,
        max_entries=131072,
        flags=1,
        pinned=True,
    ),
    "zt_dst_cidr": MapSpec(
        name="zt_dst_cidr",
        map_type=11,
        key_type="struct zt_dst_cidr_key",
        key_size=24,
        value_type="struct zt_dst",
        value_size=4,
        max_entries=16384,
        flags=1,
        pinned=True,
    ),
    "zt_hbone_sk": MapSpec(
        name="zt_hbone_sk",
        map_type=18,
        key_type="struct zt_pod_key",
        key_size=8,
        value_type="__u64",
        value_size=8,
        max_entries=8192,
        flags=0,
        pinned=True,
    ),
    "zt_inbound_sk": MapSpec(
        name="zt_inbound_sk",
        map_type=18,
        key_type="struct zt_pod_key",
        key_size=8,
        value_type="__u64",
        value_size=8,
        max_entries=8192,
        flags=0,
        pinned=True,
    ),
    "zt_local": MapSpec(
        name="zt_local",
        map_type=1,
        key_type="struct zt_local_key",
        key_size=24,
        value_type="struct zt_local",
        value_size=4,
        max_entries=32768,
        flags=1,
        pinned=True,
    ),
    "zt_orig_dst": MapSpec(
        name="zt_orig_dst",
        map_type=9,
        key_type="struct zt_orig_key",
        key_size=16,
        value_type="struct zt_orig",
        value_size=20,
        max_entries=131072,
        flags=0,
        pinned=True,
    ),
    "zt_orig_src": MapSpec(
        name="zt_orig_src",
        map_type=1,
        key_type="struct zt_orig_src_key",
        key_size=32,
        value_type="struct zt_orig_src",
        value_size=4,
        max_entries=65536,
        flags=1,
        pinned=True,
    ),
    "zt_pods": MapSpec(
        name="zt_pods",
        map_type=1,
        key_type="struct zt_pod_key",
        key_size=8,
        value_type="struct zt_pod",
        value_size=8,
        max_entries=8192,
        flags=1,
        pinned=True,
    ),
    "zt_sk_orig": MapSpec(
        name="zt_sk_orig",
        map_type=24,
        key_type="int",
        key_size=4,
        value_type="struct zt_sk_orig",
        value_size=24,
        max_entries=0,
        flags=1,
        pinned=True,
    ),
    "zt_splice_conns": MapSpec(
        name="zt_splice_conns",
        map_type=1,
        key_type="struct zt_splice_key",
        key_size=8,
        value_type="struct zt_splice_conn",
        value_size=40,
        max_entries=65536,
        flags=1,
        pinned=False,
    ),
    "zt_splice_event": MapSpec(
        name="zt_splice_event",
        map_type=27,
        key_type="",
        key_size=0,
        value_type="",
        value_size=0,
        max_entries=65536,
        flags=0,
        pinned=False,
    ),
    "zt_splice_rx": MapSpec(
        name="zt_splice_rx",
        map_type=18,
        key_type="struct zt_splice_key",
        key_size=8,
        value_type="__u64",
        value_size=8,
        max_entries=65536,
        flags=0,
        pinned=False,
    ),
    "zt_splice_stats": MapSpec(
        name="zt_splice_stats",
        map_type=6,
        key_type="__u32",
        key_size=4,
        value_type="__u64",
        value_size=8,
        max_entries=3,
        flags=0,
        pinned=False,
    ),
    "zt_splice_tx": MapSpec(
        name="zt_splice_tx",
        map_type=18,
        key_type="struct zt_splice_key",
        key_size=8,
        value_type="__u64",
        value_size=8,
        max_entries=65536,
        flags=0,
        pinned=False,
    ),
    "zt_version": MapSpec(
        name="zt_version",
        map_type=2,
        key_type="__u32",
        key_size=4,
        value_type="struct zt_version",
        value_size=8,
        max_entries=1,
        flags=0,
        pinned=True,
    ),
}

# --- programs


@dataclass(frozen=True, slots=True)
class ProgSpec:
    name: str
    section: str  # libbpf section name, which sets the program and attach type
    object_file: str  # in bpf/out


PROG_CONNECT4 = "zt_connect4"
PROG_CONNECT6 = "zt_connect6"
PROG_GETPEERNAME4 = "zt_getpeername4"
PROG_GETPEERNAME6 = "zt_getpeername6"
PROG_RECVMSG4 = "zt_recvmsg4"
PROG_RECVMSG6 = "zt_recvmsg6"
PROG_SENDMSG4 = "zt_sendmsg4"
PROG_SENDMSG6 = "zt_sendmsg6"
PROG_SK_LOOKUP = "zt_sk_lookup"
PROG_SOCKOPS = "zt_sockops"
PROG_SPLICE_VERDICT = "zt_splice_verdict"

PROG_SPECS: dict[str, ProgSpec] = {
    "zt_connect4": ProgSpec("zt_connect4", "cgroup/connect4", "connect.o"),
    "zt_connect6": ProgSpec("zt_connect6", "cgroup/connect6", "connect.o"),
    "zt_getpeername4": ProgSpec("zt_getpeername4", "cgroup/getpeername4", "getpeername.o"),
    "zt_getpeername6": ProgSpec("zt_getpeername6", "cgroup/getpeername6", "getpeername.o"),
    "zt_recvmsg4": ProgSpec("zt_recvmsg4", "cgroup/recvmsg4", "dns.o"),
    "zt_recvmsg6": ProgSpec("zt_recvmsg6", "cgroup/recvmsg6", "dns.o"),
    "zt_sendmsg4": ProgSpec("zt_sendmsg4", "cgroup/sendmsg4", "dns.o"),
    "zt_sendmsg6": ProgSpec("zt_sendmsg6", "cgroup/sendmsg6", "dns.o"),
    "zt_sk_lookup": ProgSpec("zt_sk_lookup", "sk_lookup", "sk_lookup.o"),
    "zt_sockops": ProgSpec("zt_sockops", "sockops", "sockops.o"),
    "zt_splice_verdict": ProgSpec("zt_splice_verdict", "sk_skb/stream_verdict", "splice.o"),
}
OBJECT_FILES = (
    "connect.o",
    "dns.o",
    "getpeername.o",
    "sk_lookup.o",
    "sockops.o",
    "splice.o",
)


@dataclass(frozen=True, slots=True)
class RodataVar:
    """A ``const volatile`` global the loader sets before loading its object."""

    name: str
    object_file: str
    offset: int  # in the object's .rodata
    size: int


RODATA_VARS: dict[str, RodataVar] = {
    "zt_pod_netns_cookie": RodataVar("zt_pod_netns_cookie", "sk_lookup.o", 0, 8),
}
