"""A thin ctypes binding of libbpf (Debian's ``libbpf.so.1``, version 1.1 or newer).

Only what the loader and the map adapter use is bound. Every failure becomes a
``LibbpfError`` naming the call, its subject and the errno; libbpf's own messages (the
verifier log among them) go to the ``ztunnel_py.bpf.libbpf`` logger and the most recent ones
are attached to load errors. libbpf 1.x reports errors as negative return values or NULL
pointers with ``errno`` set, which is what ``_check`` and ``_check_ptr`` read.

Handles (``BpfObject``, ``BpfProgram``, ``BpfMapHandle``, ``BpfLink``) wrap the C pointers;
``BpfObject.close()`` frees the object and its programs and maps (pinned ones stay in bpffs).
"""

from __future__ import annotations

import collections
import ctypes
import ctypes.util
import functools
import logging
import os
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

from ztunnel_py.bpf.errors import LibbpfError

log = logging.getLogger(__name__)

# UAPI numbers (include/uapi/linux/bpf.h); stable kernel ABI.
BPF_MAP_TYPE_HASH = 1
BPF_MAP_TYPE_PERCPU_ARRAY = 6
BPF_MAP_TYPE_LRU_HASH = 9
BPF_MAP_TYPE_LPM_TRIE = 11
BPF_MAP_TYPE_SOCKHASH = 18
BPF_MAP_TYPE_SK_STORAGE = 24
BPF_PROG_TYPE_SOCK_OPS = 13
BPF_PROG_TYPE_CGROUP_SOCK_ADDR = 18
BPF_PROG_TYPE_SK_LOOKUP = 30
BPF_CGROUP_SOCK_OPS = 3
BPF_CGROUP_INET4_CONNECT = 10
BPF_CGROUP_INET6_CONNECT = 11
BPF_CGROUP_UDP4_SENDMSG = 14
BPF_CGROUP_UDP6_SENDMSG = 15
BPF_CGROUP_UDP4_RECVMSG = 19
BPF_CGROUP_UDP6_RECVMSG = 20
BPF_CGROUP_INET4_GETPEERNAME = 29
BPF_CGROUP_INET6_GETPEERNAME = 30
BPF_SK_LOOKUP = 36
BPF_SK_SKB_STREAM_VERDICT = 5
BPF_PROG_TYPE_SK_SKB = 14
BPF_LINK_TYPE_CGROUP = 3
BPF_LINK_TYPE_NETNS = 5
BPF_FUNC_getsockopt = 57
BPF_FUNC_sk_storage_get = 107
BPF_FUNC_get_netns_cookie = 122
BPF_FUNC_sk_assign = 124
BPF_ANY = 0
SK_LOOKUP_INGRESS_IFINDEX_OFFSET = 64  # offsetof(struct bpf_sk_lookup, ingress_ifindex)

_PRINT_LEVELS = {0: logging.WARNING, 1: logging.INFO, 2: logging.DEBUG}


_PrintFn = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)
_recent: collections.deque[str] = collections.deque(maxlen=400)
_recent_lock = threading.Lock()
_vp = ctypes.c_void_p
_int = ctypes.c_int
_str = ctypes.c_char_p
_SIGNATURES: dict[str, tuple[object, ...]] = {
    # name: (restype, *argtypes)
    "bpf_object__open_file": (_vp, _str, _vp),
    "bpf_object__load": (_int, _vp),
    "bpf_object__close": (None, _vp),
    "bpf_object__find_program_by_name": (_vp, _vp, _str),
    "bpf_object__next_map": (_vp, _vp, _vp),
    "bpf_map__name": (_str, _vp),
    "bpf_map__initial_value": (_vp, _vp, ctypes.POINTER(ctypes.c_size_t)),
    "bpf_map__set_initial_value": (_int, _vp, _vp, ctypes.c_size_t),
    "bpf_program__name": (_str, _vp),
    "bpf_program__attach_cgroup": (_vp, _vp, _int),
    "bpf_program__attach_netns": (_vp, _vp, _int),
    "bpf_program__fd": (_int, _vp),
    "bpf_map__fd": (_int, _vp),
    "bpf_prog_attach": (_int, _int, _int, _int, ctypes.c_uint),
    "bpf_link__open": (_vp, _str),
    "bpf_link__pin": (_int, _vp, _str),
    "bpf_link__fd": (_int, _vp),
    "bpf_link__update_program": (_int, _vp, _vp),
    "bpf_link__destroy": (_int, _vp),
    "bpf_obj_get": (_int, _str),
    "bpf_obj_get_info_by_fd": (_int, _int, _vp, ctypes.POINTER(ctypes.c_uint32)),
    "bpf_map_update_elem": (_int, _int, _vp, _vp, ctypes.c_uint64),
    "bpf_map_lookup_elem": (_int, _int, _vp, _vp),
    "bpf_map_delete_elem": (_int, _int, _vp),
    "bpf_map_get_next_key": (_int, _int, _vp, _vp),
    "bpf_prog_load": (_int, _int, _str, _str, _vp, ctypes.c_size_t, _vp),
    "bpf_link_create": (_int, _int, _int, _int, _vp),
    "libbpf_probe_bpf_prog_type": (_int, _int, _vp),
    "libbpf_probe_bpf_map_type": (_int, _int, _vp),
    "libbpf_num_possible_cpus": (_int,),
    "libbpf_set_print": (_vp, _PrintFn),
    "ring_buffer__new": (_vp, _int, _vp, _vp, _vp),
    "ring_buffer__consume": (_int, _vp),
    "ring_buffer__epoll_fd": (_int, _vp),
    "ring_buffer__free": (None, _vp),
}
# ring_buffer_sample_fn: int (*)(void *ctx, void *data, size_t size)
_SampleFn = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t)


@functools.cache
def _library() -> ctypes.CDLL:
    """libbpf, loaded and bound on first use (pure modules import this package without it)."""
    name = ctypes.util.find_library("bpf") or "libbpf.so.1"
    try:
        lib = ctypes.CDLL(name, use_errno=True)
    except OSError as e:
        raise LibbpfError("dlopen", 0, f"{name}: {e}; install libbpf1 (Debian) or libbpf") from e
    for fn_name, (restype, *argtypes) in _SIGNATURES.items():
        fn = getattr(lib, fn_name)
        fn.restype = restype
        fn.argtypes = argtypes
    lib.libbpf_set_print(_print_callback)
    return lib


@functools.cache
def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    libc.vsnprintf.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_void_p, ctypes.c_void_p]
    libc.vsnprintf.restype = ctypes.c_int
    return libc


# --------------------------------------------------------------------------- libbpf's log


def _print(level: int, fmt: int | None, args: int | None) -> int:
    buf = ctypes.create_string_buffer(4096)
    _libc().vsnprintf(buf, len(buf), fmt, args)
    text = buf.value.decode(errors="replace").rstrip("\n")
    if level <= 1:  # warnings (the verifier log among them) and info, not debug chatter
        with _recent_lock:
            _recent.extend(text.splitlines())
    log.log(_PRINT_LEVELS.get(level, logging.DEBUG), "%s", text)
    return 0


_print_callback = _PrintFn(_print)  # kept alive for as long as libbpf may call it


class LogCapture:
    """Collects libbpf's messages printed while the ``with`` body runs (verifier logs)."""

    def __enter__(self) -> LogCapture:
        with _recent_lock:
            _recent.clear()
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def text(self, limit: int = 60) -> str:
        with _recent_lock:
            lines = list(_recent)
        return "\n".join(lines[-limit:])


# --------------------------------------------------------------------------- error helpers


def _errno() -> int:
    return ctypes.get_errno()


def _check(ret: int, op: str, detail: str = "", log_text: str = "") -> int:
    if ret < 0:
        raise LibbpfError(op, -ret, detail, log=log_text)
    return ret


def _check_ptr(ptr: int | None, op: str, detail: str = "") -> int:
    if not ptr:
        raise LibbpfError(op, _errno(), detail)
    return ptr


# --------------------------------------------------------------------------- structs


class _ObjectOpenOpts(ctypes.Structure):
    _fields_ = [
        ("sz", ctypes.c_size_t),
        ("object_name", ctypes.c_char_p),
        ("relaxed_maps", ctypes.c_bool),
        ("pin_root_path", ctypes.c_char_p),
        ("_attach_prog_fd", ctypes.c_uint32),
        ("kconfig", ctypes.c_char_p),
        ("btf_custom_path", ctypes.c_char_p),
        ("kernel_log_buf", ctypes.c_char_p),
        ("kernel_log_size", ctypes.c_size_t),
        ("kernel_log_level", ctypes.c_uint32),
    ]


class _ProgLoadOpts(ctypes.Structure):
    _fields_ = [
        ("sz", ctypes.c_size_t),
        ("attempts", ctypes.c_int),
        ("expected_attach_type", ctypes.c_uint32),
        ("prog_btf_fd", ctypes.c_uint32),
        ("prog_flags", ctypes.c_uint32),
        ("prog_ifindex", ctypes.c_uint32),
        ("kern_version", ctypes.c_uint32),
        ("attach_btf_id", ctypes.c_uint32),
        ("attach_prog_fd", ctypes.c_uint32),
        ("attach_btf_obj_fd", ctypes.c_uint32),
        ("fd_array", ctypes.c_void_p),
        ("func_info", ctypes.c_void_p),
        ("func_info_cnt", ctypes.c_uint32),
        ("func_info_rec_size", ctypes.c_uint32),
        ("line_info", ctypes.c_void_p),
        ("line_info_cnt", ctypes.c_uint32),
        ("line_info_rec_size", ctypes.c_uint32),
        ("log_level", ctypes.c_uint32),
        ("log_size", ctypes.c_uint32),
        ("log_buf", ctypes.c_char_p),
    ]


class _CgroupLinkInfo(ctypes.Structure):
    _fields_ = [("cgroup_id", ctypes.c_uint64), ("attach_type", ctypes.c_uint32)]


class _NetnsLinkInfo(ctypes.Structure):
    _fields_ = [("netns_ino", ctypes.c_uint32), ("attach_type", ctypes.c_uint32)]


class _LinkInfoUnion(ctypes.Union):
    _fields_ = [
        ("cgroup", _CgroupLinkInfo),
        ("netns", _NetnsLinkInfo),
        ("_raw", ctypes.c_uint8 * 32),
    ]


class _LinkInfo(ctypes.Structure):
    _fields_ = [
        ("type", ctypes.c_uint32),
        ("id", ctypes.c_uint32),
        ("prog_id", ctypes.c_uint32),
        ("u", _LinkInfoUnion),
    ]


class LinkInfo:
    """What the kernel says about a BPF link (``bpf_obj_get_info_by_fd``)."""

    def __init__(self, raw: _LinkInfo) -> None:
        self.type = int(raw.type)
        self.id = int(raw.id)
        self.prog_id = int(raw.prog_id)
        self.cgroup_id = int(raw.u.cgroup.cgroup_id) if self.type == BPF_LINK_TYPE_CGROUP else 0
        self.netns_ino = int(raw.u.netns.netns_ino) if self.type == BPF_LINK_TYPE_NETNS else 0
        if self.type == BPF_LINK_TYPE_CGROUP:
            self.attach_type = int(raw.u.cgroup.attach_type)
        elif self.type == BPF_LINK_TYPE_NETNS:
            self.attach_type = int(raw.u.netns.attach_type)
        else:
            self.attach_type = -1


# --------------------------------------------------------------------------- handles


class BpfProgram:
    def __init__(self, ptr: int, obj: BpfObject) -> None:
        self._ptr = ptr
        self.object = obj  # the program lives as long as its object

    @property
    def name(self) -> str:
        raw: bytes = _library().bpf_program__name(self._ptr)
        return raw.decode()

    def attach_cgroup(self, cgroup_fd: int) -> BpfLink:
        ptr = _library().bpf_program__attach_cgroup(self._ptr, cgroup_fd)
        return BpfLink(_check_ptr(ptr, "bpf_program__attach_cgroup", self.name))

    def attach_netns(self, netns_fd: int) -> BpfLink:
        ptr = _library().bpf_program__attach_netns(self._ptr, netns_fd)
        return BpfLink(_check_ptr(ptr, "bpf_program__attach_netns", self.name))

    def attach_to_map(self, map_fd: int, attach_type: int) -> None:
        """Attach to a sockmap/sockhash (sk_skb, sk_msg): the map holds the program from then
        on, for as long as the map lives."""
        fd = _check(_library().bpf_program__fd(self._ptr), "bpf_program__fd", self.name)
        _check(
            _library().bpf_prog_attach(fd, map_fd, attach_type, 0),
            "bpf_prog_attach",
            f"{self.name} to map fd {map_fd}",
        )


class BpfMapHandle:
    """A map inside an opened object (before load: set its initial value)."""

    def __init__(self, ptr: int) -> None:
        self._ptr = ptr

    @property
    def name(self) -> str:
        raw: bytes = _library().bpf_map__name(self._ptr)
        return raw.decode()

    @property
    def fd(self) -> int:
        """The loaded map's fd (owned by the object: dup it to keep the map after close)."""
        return _check(_library().bpf_map__fd(self._ptr), "bpf_map__fd", self.name)

    def initial_value(self) -> bytes:
        size = ctypes.c_size_t(0)
        ptr = _library().bpf_map__initial_value(self._ptr, ctypes.byref(size))
        _check_ptr(ptr, "bpf_map__initial_value", self.name)
        return ctypes.string_at(ptr, size.value)

    def set_initial_value(self, data: bytes) -> None:
        buf = ctypes.create_string_buffer(data, len(data))
        _check(
            _library().bpf_map__set_initial_value(self._ptr, buf, len(data)),
            "bpf_map__set_initial_value",
            self.name,
        )


class BpfObject:
    """An opened (then loaded) BPF ELF object."""

    def __init__(self, path: Path, *, pin_root_path: Path | None = None) -> None:
        self.path = path
        self._opts = _ObjectOpenOpts()
        self._opts.sz = ctypes.sizeof(_ObjectOpenOpts)
        self._pin_root = str(pin_root_path).encode() if pin_root_path else None
        self._opts.pin_root_path = self._pin_root
        ptr = _library().bpf_object__open_file(str(path).encode(), ctypes.byref(self._opts))
        self._ptr: int | None = _check_ptr(ptr, "bpf_object__open_file", str(path))

    def _obj(self) -> int:
        if self._ptr is None:
            raise LibbpfError("bpf_object", 9, f"{self.path} is closed")  # EBADF
        return self._ptr

    def load(self) -> None:
        with LogCapture() as capture:
            ret = _library().bpf_object__load(self._obj())
        _check(ret, "bpf_object__load", str(self.path), capture.text() if ret < 0 else "")

    def program(self, name: str) -> BpfProgram:
        ptr = _library().bpf_object__find_program_by_name(self._obj(), name.encode())
        return BpfProgram(_check_ptr(ptr, "bpf_object__find_program_by_name", name), self)

    def maps(self) -> Iterator[BpfMapHandle]:
        ptr = _library().bpf_object__next_map(self._obj(), None)
        while ptr:
            yield BpfMapHandle(ptr)
            ptr = _library().bpf_object__next_map(self._obj(), ptr)

    def close(self) -> None:
        if self._ptr is not None:
            _library().bpf_object__close(self._ptr)
            self._ptr = None


class BpfLink:
    """A BPF link; ``destroy()`` closes our handle: a pinned link stays attached."""

    def __init__(self, ptr: int) -> None:
        self._ptr: int | None = ptr

    @classmethod
    def open(cls, path: Path) -> BpfLink:
        """Re-adopt a pinned link (``bpf_link__open``)."""
        ptr = _library().bpf_link__open(str(path).encode())
        return cls(_check_ptr(ptr, "bpf_link__open", str(path)))

    def _link(self) -> int:
        if self._ptr is None:
            raise LibbpfError("bpf_link", 9, "link handle is destroyed")
        return self._ptr

    @property
    def fd(self) -> int:
        return _check(_library().bpf_link__fd(self._link()), "bpf_link__fd")

    def pin(self, path: Path) -> None:
        _check(
            _library().bpf_link__pin(self._link(), str(path).encode()), "bpf_link__pin", str(path)
        )

    def update_program(self, prog: BpfProgram) -> None:
        """Atomically replace the attached program (same attach point, no gap)."""
        _check(
            _library().bpf_link__update_program(self._link(), prog._ptr),
            "bpf_link__update_program",
            prog.name,
        )

    def info(self) -> LinkInfo:
        return link_info(self.fd)

    def destroy(self) -> None:
        if self._ptr is not None:
            _library().bpf_link__destroy(self._ptr)
            self._ptr = None


class RingBuffer:
    """A consumer of one BPF ring buffer map (``ring_buffer__new``): ``fd`` turns readable when
    records wait, ``consume()`` returns them (copied) without blocking."""

    def __init__(self, map_fd: int) -> None:
        self._records: list[bytes] = []
        self._callback = _SampleFn(self._sample)  # kept alive as long as the ring buffer
        ptr = _library().ring_buffer__new(map_fd, self._callback, None, None)
        self._ptr: int | None = _check_ptr(ptr, "ring_buffer__new", f"map fd {map_fd}")

    def _sample(self, _ctx: int | None, data: int | None, size: int) -> int:
        self._records.append(ctypes.string_at(data, size) if data else b"")
        return 0

    def _rb(self) -> int:
        if self._ptr is None:
            raise LibbpfError("ring_buffer", 9, "ring buffer is freed")
        return self._ptr

    @property
    def fd(self) -> int:
        return _check(_library().ring_buffer__epoll_fd(self._rb()), "ring_buffer__epoll_fd")

    def consume(self) -> list[bytes]:
        _check(_library().ring_buffer__consume(self._rb()), "ring_buffer__consume")
        records, self._records = self._records, []
        return records

    def free(self) -> None:
        if self._ptr is not None:
            _library().ring_buffer__free(self._ptr)
            self._ptr = None


# --------------------------------------------------------------------------- fd-level calls


def obj_get(path: Path) -> int:
    """An fd for a pinned object (``bpf_obj_get``); the caller closes it."""
    return _check(_library().bpf_obj_get(str(path).encode()), "bpf_obj_get", str(path))


def link_info(fd: int) -> LinkInfo:
    raw = _LinkInfo()
    size = ctypes.c_uint32(ctypes.sizeof(raw))
    _check(
        _library().bpf_obj_get_info_by_fd(fd, ctypes.byref(raw), ctypes.byref(size)),
        "bpf_obj_get_info_by_fd",
        f"link fd {fd}",
    )
    return LinkInfo(raw)


def map_update(fd: int, key: bytes, value: bytes, flags: int = BPF_ANY) -> int:
    """Returns 0 or the positive errno (the caller decides what an errno means)."""
    ret = _library().bpf_map_update_elem(fd, key, value, flags)
    return -ret if ret < 0 else 0


def map_lookup(fd: int, key: bytes, value_size: int) -> tuple[int, bytes]:
    buf = ctypes.create_string_buffer(value_size)
    ret = _library().bpf_map_lookup_elem(fd, key, buf)
    return (-ret, b"") if ret < 0 else (0, buf.raw)


def map_delete(fd: int, key: bytes) -> int:
    ret = _library().bpf_map_delete_elem(fd, key)
    return -ret if ret < 0 else 0


def map_next_key(fd: int, key: bytes | None, key_size: int) -> tuple[int, bytes]:
    buf = ctypes.create_string_buffer(key_size)
    ret = _library().bpf_map_get_next_key(fd, key, buf)
    return (-ret, b"") if ret < 0 else (0, buf.raw)


def num_possible_cpus() -> int:
    return _check(_library().libbpf_num_possible_cpus(), "libbpf_num_possible_cpus")


def link_create(prog_fd: int, target_fd: int, attach_type: int) -> int:
    """A raw link fd (used by probes); closing the fd detaches it."""
    return _check(
        _library().bpf_link_create(prog_fd, target_fd, attach_type, None),
        "bpf_link_create",
        f"attach type {attach_type}",
    )


# --------------------------------------------------------------------------- feature probes


def probe_prog_type(prog_type: int) -> bool:
    return bool(_library().libbpf_probe_bpf_prog_type(prog_type, None) == 1)


def probe_map_type(map_type: int) -> bool:
    return bool(_library().libbpf_probe_bpf_map_type(map_type, None) == 1)


def _insn(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    return struct.pack("<BBhi", code, (src << 4) | dst, off, imm)


RETURN_ONE = _insn(0xB7, imm=1) + _insn(0x95)  # r0 = 1; exit
READ_SK_LOOKUP_INGRESS_IFINDEX = (
    _insn(0x61, dst=2, src=1, off=SK_LOOKUP_INGRESS_IFINDEX_OFFSET) + RETURN_ONE
)  # r2 = *(u32 *)(r1 + ingress_ifindex); r0 = 1 (SK_PASS); exit


def _prog_load(
    prog_type: int,
    insns: bytes,
    expected_attach_type: int,
    log_buf: ctypes.Array[ctypes.c_char] | None,
) -> int:
    opts = _ProgLoadOpts()
    opts.sz = ctypes.sizeof(_ProgLoadOpts)
    opts.expected_attach_type = expected_attach_type
    if log_buf is not None:
        opts.log_level = 1
        opts.log_size = len(log_buf)
        opts.log_buf = ctypes.cast(log_buf, ctypes.c_char_p)
    code = ctypes.create_string_buffer(insns, len(insns))
    return int(
        _library().bpf_prog_load(
            prog_type, b"zt_probe", b"Dual BSD/GPL", code, len(insns) // 8, ctypes.byref(opts)
        )
    )


def prog_load_fd(prog_type: int, insns: bytes, *, expected_attach_type: int = 0) -> int:
    """Load a tiny probe program; returns its fd (the caller closes it)."""
    return _check(
        _prog_load(prog_type, insns, expected_attach_type, None),
        "bpf_prog_load",
        f"probe program type {prog_type}",
    )


# The verifier's words for "this helper does not exist here" (old and new kernels).
_NO_HELPER = (b"unknown func", b"invalid func", b"cannot use helper")


def probe_helper(prog_type: int, helper_id: int, *, expected_attach_type: int = 0) -> bool:
    """Whether programs of ``prog_type`` may call ``helper_id``.

    Loads ``r0 = helper(ctx, 0, 0, 0, 0); r0 = 1; exit``. A rejection for any reason other
    than the helper itself (argument types) still proves the helper is available. libbpf's own
    probe misses the wording of recent kernels, hence this one.
    """
    insns = (
        _insn(0xB7, dst=2)
        + _insn(0xB7, dst=3)
        + _insn(0xB7, dst=4)
        + _insn(0xB7, dst=5)
        + _insn(0x85, imm=helper_id)  # call helper_id (r1 still holds ctx)
        + RETURN_ONE
    )
    log_buf = ctypes.create_string_buffer(8192)
    fd = _prog_load(prog_type, insns, expected_attach_type, log_buf)
    if fd >= 0:
        os.close(fd)
        return True
    return not any(word in log_buf.value for word in _NO_HELPER)
