"""Load the BPF programs, attach them through BPF links, pin everything, re-adopt on restart.

Pinned layout under ``Config.bpf_pin_path`` (directories mode 0700, on bpffs):

    maps/zt_*                       every map, pinned by name by libbpf (shared by all objects)
    links/cgroup/<program>          connect4/6, getpeername4/6, sock_ops, sendmsg4/6 and
                                    recvmsg4/6 (DNS capture) on the pods' parent cgroup
    links/pods/<pod uid>/sk_lookup  one sk_lookup link per enrolled pod netns

A restarted daemon finds the pins: ``zt_version`` must carry this build's ABI (else
``IncompatiblePinnedState``), libbpf reuses the pinned maps (it refuses any whose type, sizes
or flags differ), and every pinned link is atomically switched to the freshly loaded program
(``bpf_link_update``), so redirection never stops across a restart. Links whose cgroup or
netns is gone are removed. ``close()`` only drops our fds: the datapath stays.
``uninstall()`` detaches and removes everything.

The sk_lookup program cannot ask for its netns cookie, so each pod gets its own instance with
the cookie set in ``.rodata`` before loading (``zt_pod_netns_cookie``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import hashlib
import ipaddress
import logging
import os
import re
import socket
import struct
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ztunnel_py.bpf import _types as t
from ztunnel_py.bpf import libbpf
from ztunnel_py.bpf.dump import dump_maps
from ztunnel_py.bpf.errors import BpfError, IncompatiblePinnedState, KeyNotFound, LibbpfError
from ztunnel_py.bpf.libbpf import BpfLink, BpfObject, BpfProgram
from ztunnel_py.bpf.maps import LibbpfMap
from ztunnel_py.bpf.origdst import BpfOriginalDestination
from ztunnel_py.bpf.projection import addr16, fill, pod_key
from ztunnel_py.config import DEFAULT_PACKET_MARK, Config
from ztunnel_py.errors import UnsupportedFeature
from ztunnel_py.redirect.netns import SO_NETNS_COOKIE, cookie_of_netns

log = logging.getLogger(__name__)

DEFAULT_OBJECT_DIR = Path(__file__).resolve().parents[2] / "bpf" / "out"
BPFFS_ROOT = Path("/sys/fs/bpf")
PROBE_IP4 = ipaddress.IPv4Address("169.254.7.127")  # istio-cni's kubelet probe SNAT address
PROBE_IP6 = ipaddress.IPv6Address("fd16:9254:7127:1337:ffff:ffff:ffff:ffff")
DEFAULT_MARK_MASK = 0xFFF

# Program -> the attach type its section implies (checked against pinned links on restart).
CGROUP_PROGRAMS: dict[str, int] = {
    t.PROG_CONNECT4: libbpf.BPF_CGROUP_INET4_CONNECT,
    t.PROG_CONNECT6: libbpf.BPF_CGROUP_INET6_CONNECT,
    t.PROG_GETPEERNAME4: libbpf.BPF_CGROUP_INET4_GETPEERNAME,
    t.PROG_GETPEERNAME6: libbpf.BPF_CGROUP_INET6_GETPEERNAME,
    t.PROG_SOCKOPS: libbpf.BPF_CGROUP_SOCK_OPS,
    t.PROG_SENDMSG4: libbpf.BPF_CGROUP_UDP4_SENDMSG,
    t.PROG_SENDMSG6: libbpf.BPF_CGROUP_UDP6_SENDMSG,
    t.PROG_RECVMSG4: libbpf.BPF_CGROUP_UDP4_RECVMSG,
    t.PROG_RECVMSG6: libbpf.BPF_CGROUP_UDP6_RECVMSG,
}
COUNTER_NAMES: dict[int, str] = {
    value: name.removeprefix("ZT_CNT_").lower()
    for name, value in vars(t).items()
    if name.startswith("ZT_CNT_") and name != "ZT_CNT_MAX"
}
_SAFE_NAME = re.compile(r"[A-Za-z0-9_.-]{1,128}")
_MS_NOSUID, _MS_NODEV, _MS_NOEXEC = 2, 4, 8


@dataclass(frozen=True, slots=True)
class Feature:
    name: str
    hint: str
    check: Callable[[], bool]


# ----------------------------------------------------------------------------- filesystems


@dataclass(frozen=True, slots=True)
class Mount:
    path: Path
    fstype: str


def mounts() -> list[Mount]:
    """This process's mounts (``/proc/self/mountinfo``), octal escapes decoded."""
    result = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        mount_point = left.split()[4].encode().decode("unicode_escape")
        result.append(Mount(Path(mount_point), right.split()[0]))
    return result


def mount_of(path: Path) -> Mount | None:
    """The mount that holds ``path`` (the longest mount-point prefix; later mounts win)."""
    best: Mount | None = None
    resolved = path.resolve()
    for m in mounts():
        inside = resolved == m.path or m.path in resolved.parents
        if inside and (best is None or len(m.path.parts) >= len(best.path.parts)):
            best = m
    return best


def cgroup2_mounts() -> list[Path]:
    return [m.path for m in mounts() if m.fstype == "cgroup2"]


def ensure_bpffs(pin_path: Path) -> None:
    """``pin_path`` must be on bpffs; mount it at /sys/fs/bpf when that is where it belongs."""
    existing = pin_path if pin_path.exists() else _existing_parent(pin_path)
    m = mount_of(existing)
    if m is not None and m.fstype == "bpf":
        return
    if pin_path == BPFFS_ROOT or BPFFS_ROOT in pin_path.parents:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        if (
            libc.mount(
                b"bpf", bytes(BPFFS_ROOT), b"bpf", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC, b"mode=0700"
            )
            != 0
        ):
            err = ctypes.get_errno()
            raise UnsupportedFeature(
                "bpf filesystem",
                f"{BPFFS_ROOT} is not mounted and mounting it failed: {os.strerror(err)}; "
                f"mount it (mount -t bpf bpf {BPFFS_ROOT}) or give the daemon CAP_SYS_ADMIN",
            )
        log.info("mounted bpffs at %s", BPFFS_ROOT)
        return
    raise UnsupportedFeature(
        "bpf filesystem", f"BPF_PIN_PATH={pin_path} is not on a bpf filesystem (mount -t bpf)"
    )


def _existing_parent(path: Path) -> Path:
    for parent in path.parents:
        if parent.exists():
            return parent
    return Path("/")


def _mkdir_private(path: Path) -> None:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path, 0o700)


def pod_dir_name(uid: str) -> str:
    """A pod uid as a bpffs directory name (Kubernetes uids already are)."""
    if _SAFE_NAME.fullmatch(uid) and uid not in {".", ".."}:
        return uid
    return "uid-" + hashlib.sha256(uid.encode()).hexdigest()[:32]


# ----------------------------------------------------------------------------- feature probe


def _so_netns_cookie() -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8)
        except OSError:
            return False
    return True


def _loads(prog_type: int, insns: bytes, attach_type: int) -> Callable[[], bool]:
    def check() -> bool:
        try:
            fd = libbpf.prog_load_fd(prog_type, insns, expected_attach_type=attach_type)
        except LibbpfError:
            return False
        os.close(fd)
        return True

    return check


def _cgroup_link_works(cgroup_path: Path) -> Callable[[], bool]:
    def check() -> bool:
        prog_fd = libbpf.prog_load_fd(
            libbpf.BPF_PROG_TYPE_CGROUP_SOCK_ADDR,
            libbpf.RETURN_ONE,
            expected_attach_type=libbpf.BPF_CGROUP_INET4_CONNECT,
        )
        cgroup_fd = os.open(cgroup_path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            # A program that allows everything, attached and detached at once.
            os.close(libbpf.link_create(prog_fd, cgroup_fd, libbpf.BPF_CGROUP_INET4_CONNECT))
        except LibbpfError:
            return False
        finally:
            os.close(cgroup_fd)
            os.close(prog_fd)
        return True

    return check


def features(cgroup_path: Path) -> list[Feature]:
    """What eBPF redirection needs, in the order worth reporting."""
    sock_addr = libbpf.BPF_PROG_TYPE_CGROUP_SOCK_ADDR
    connect4 = libbpf.BPF_CGROUP_INET4_CONNECT

    def helper(prog_type: int, helper_id: int, attach: int = 0) -> Callable[[], bool]:
        return lambda: libbpf.probe_helper(prog_type, helper_id, expected_attach_type=attach)

    def map_type(kind: int) -> Callable[[], bool]:
        return lambda: libbpf.probe_map_type(kind)

    def prog_type(kind: int) -> Callable[[], bool]:
        return lambda: libbpf.probe_prog_type(kind)

    return [
        Feature(
            "bpf() syscall",
            "creating a BPF map failed: run as root or with CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN",
            map_type(libbpf.BPF_MAP_TYPE_HASH),
        ),
        Feature("BPF_PROG_TYPE_CGROUP_SOCK_ADDR", "Linux 4.17+", prog_type(sock_addr)),
        Feature("BPF_PROG_TYPE_SOCK_OPS", "Linux 4.13+", prog_type(libbpf.BPF_PROG_TYPE_SOCK_OPS)),
        Feature("BPF_PROG_TYPE_SK_LOOKUP", "Linux 5.9+", prog_type(libbpf.BPF_PROG_TYPE_SK_LOOKUP)),
        Feature("BPF_MAP_TYPE_LRU_HASH", "Linux 4.10+", map_type(libbpf.BPF_MAP_TYPE_LRU_HASH)),
        Feature("BPF_MAP_TYPE_LPM_TRIE", "Linux 4.11+", map_type(libbpf.BPF_MAP_TYPE_LPM_TRIE)),
        Feature("BPF_MAP_TYPE_SOCKHASH", "Linux 4.18+", map_type(libbpf.BPF_MAP_TYPE_SOCKHASH)),
        Feature("BPF_MAP_TYPE_SK_STORAGE", "Linux 5.2+", map_type(libbpf.BPF_MAP_TYPE_SK_STORAGE)),
        Feature(
            "cgroup/getpeername4 attach type",
            "Linux 5.8+",
            _loads(sock_addr, libbpf.RETURN_ONE, libbpf.BPF_CGROUP_INET4_GETPEERNAME),
        ),
        Feature(
            "bpf_get_netns_cookie() in cgroup/connect programs",
            "Linux 5.7+",
            helper(sock_addr, libbpf.BPF_FUNC_get_netns_cookie, connect4),
        ),
        Feature(
            "bpf_getsockopt() in cgroup/connect programs (SO_MARK check)",
            "Linux 5.8+",
            helper(sock_addr, libbpf.BPF_FUNC_getsockopt, connect4),
        ),
        Feature(
            "bpf_sk_storage_get() in cgroup/connect programs",
            "a 6.x kernel",
            helper(sock_addr, libbpf.BPF_FUNC_sk_storage_get, connect4),
        ),
        Feature(
            "bpf_get_netns_cookie() in sock_ops programs",
            "Linux 5.15+",
            helper(libbpf.BPF_PROG_TYPE_SOCK_OPS, libbpf.BPF_FUNC_get_netns_cookie),
        ),
        Feature(
            "bpf_sk_storage_get() in sock_ops programs",
            "a 6.x kernel",
            helper(libbpf.BPF_PROG_TYPE_SOCK_OPS, libbpf.BPF_FUNC_sk_storage_get),
        ),
        Feature(
            "bpf_sk_assign() in sk_lookup programs",
            "Linux 5.9+",
            helper(libbpf.BPF_PROG_TYPE_SK_LOOKUP, libbpf.BPF_FUNC_sk_assign, libbpf.BPF_SK_LOOKUP),
        ),
        Feature(
            "bpf_sk_lookup.ingress_ifindex",
            "Linux 5.17+",
            _loads(
                libbpf.BPF_PROG_TYPE_SK_LOOKUP,
                libbpf.READ_SK_LOOKUP_INGRESS_IFINDEX,
                libbpf.BPF_SK_LOOKUP,
            ),
        ),
        Feature("SO_NETNS_COOKIE socket option", "Linux 5.14+", _so_netns_cookie),
        Feature(
            f"BPF links on cgroup {cgroup_path}",
            "Linux 5.7+, and no exclusive (non-multi) program attached to that cgroup",
            _cgroup_link_works(cgroup_path),
        ),
    ]


def probe_features(cgroup_path: Path) -> None:
    """Raise ``UnsupportedFeature`` naming the first missing kernel feature."""
    for feature in features(cgroup_path):
        if not feature.check():
            raise UnsupportedFeature(feature.name, f"needs {feature.hint}")


def find_pods_cgroup() -> Path | None:
    """The kubelet's parent cgroup of all pods: ``kubepods.slice`` (systemd driver) or
    ``kubepods`` (cgroupfs driver) at the top of a cgroup v2 mount, if there is one."""
    for root in cgroup2_mounts():
        for name in ("kubepods.slice", "kubepods"):
            if (root / name).is_dir():
                return root / name
    return None


def check_cgroup2(cgroup_path: Path) -> None:
    m = mount_of(cgroup_path) if cgroup_path.exists() else None
    if m is None or m.fstype != "cgroup2" or not cgroup_path.is_dir():
        found = ", ".join(str(p) for p in cgroup2_mounts()) or "none"
        raise UnsupportedFeature(
            "cgroup v2",
            f"{cgroup_path} is not a cgroup v2 directory (cgroup2 mounts here: {found}); "
            "give the parent cgroup of the pods (e.g. .../kubepods.slice)",
        )


# ----------------------------------------------------------------------------- the loader


class BpfLoader:
    """Owns the pinned BPF state of one node: maps, cgroup links, per-pod sk_lookup links."""

    def __init__(
        self,
        *,
        pin_path: Path,
        cgroup_path: Path,
        object_dir: Path = DEFAULT_OBJECT_DIR,
        packet_mark: int = DEFAULT_PACKET_MARK,
        mark_mask: int = DEFAULT_MARK_MASK,
        probe_ip4: ipaddress.IPv4Address | None = PROBE_IP4,
        probe_ip6: ipaddress.IPv6Address | None = PROBE_IP6,
        dns_capture: bool = True,
    ) -> None:
        self.pin_path = pin_path
        self.dns_capture = dns_capture
        self.cgroup_path = cgroup_path
        self.object_dir = object_dir
        self.packet_mark = packet_mark
        self.mark_mask = mark_mask
        self.probe_ip4 = probe_ip4
        self.probe_ip6 = probe_ip6
        self.maps: dict[str, LibbpfMap] = {}
        self.adopted = False  # whether start() found a previous daemon's pins

    @classmethod
    def from_config(cls, config: Config, *, cgroup_path: Path) -> BpfLoader:
        return cls(
            pin_path=config.bpf_pin_path,
            cgroup_path=cgroup_path,
            object_dir=config.bpf_object_dir or DEFAULT_OBJECT_DIR,
            packet_mark=config.packet_mark,
            dns_capture=config.dns_proxy,
        )

    # ------------------------------------------------------------------ paths

    @property
    def maps_dir(self) -> Path:
        return self.pin_path / "maps"

    @property
    def cgroup_links_dir(self) -> Path:
        return self.pin_path / "links" / "cgroup"

    @property
    def pod_links_dir(self) -> Path:
        return self.pin_path / "links" / "pods"

    def _object(self, name: str) -> Path:
        path = self.object_dir / name
        if not path.is_file():
            raise BpfError(
                f"BPF object {path} is missing: build it with `make -C bpf` "
                "(clang, libbpf-dev) or install a package that ships bpf/out"
            )
        return path

    # ------------------------------------------------------------------ start

    def start(self, *, probe: bool = True) -> None:
        """Probe, mount, check pins, load, write config, attach or re-adopt. Idempotent."""
        check_cgroup2(self.cgroup_path)
        if probe:
            probe_features(self.cgroup_path)
        ensure_bpffs(self.pin_path)
        for d in (self.pin_path, self.maps_dir, self.cgroup_links_dir, self.pod_links_dir):
            _mkdir_private(d)
        self.adopted = self._check_pinned_version()

        programs: dict[str, BpfProgram] = {}
        objects = []
        try:
            for object_file in sorted({t.PROG_SPECS[p].object_file for p in CGROUP_PROGRAMS}):
                obj = self._load(self._object(object_file))
                objects.append(obj)
                for name, spec in t.PROG_SPECS.items():
                    if spec.object_file == object_file:
                        programs[name] = obj.program(name)
            self._open_maps()
            self._write_version_and_config()
            cgroup_fd = os.open(self.cgroup_path, os.O_RDONLY | os.O_DIRECTORY)
            try:
                cgroup_id = os.fstat(cgroup_fd).st_ino
                for name, attach_type in CGROUP_PROGRAMS.items():
                    self._attach_cgroup(programs[name], attach_type, cgroup_fd, cgroup_id)
            finally:
                os.close(cgroup_fd)
        finally:
            for obj in objects:
                obj.close()  # attached programs live on in their links
        self._drop_stale_pod_links()
        log.info(
            "bpf: %s at %s, programs on cgroup %s",
            "re-adopted pinned maps and links" if self.adopted else "installed",
            self.pin_path,
            self.cgroup_path,
        )

    def _check_pinned_version(self) -> bool:
        version_pin = self.maps_dir / t.MAP_VERSION
        others = [p.name for p in self.maps_dir.iterdir()] if self.maps_dir.exists() else []
        if not version_pin.exists():
            if others:
                raise IncompatiblePinnedState(
                    str(self.pin_path), f"maps {sorted(others)} are pinned without {t.MAP_VERSION}"
                )
            return False
        version_map = LibbpfMap.open_pinned(t.MAP_VERSION, version_pin)
        try:
            raw = version_map.lookup(struct.pack("=I", 0))
        finally:
            version_map.close()
        found = t.ZtVersion.from_buffer_copy(raw).abi_version
        if found == 0:
            return False  # created but never configured: a crash during the first start
        if found != t.ZT_ABI_VERSION:
            raise IncompatiblePinnedState(
                str(self.pin_path),
                f"its maps have ABI version {found}, this build uses {t.ZT_ABI_VERSION}",
            )
        return True

    def _load(self, path: Path, rodata: dict[str, bytes] | None = None) -> BpfObject:
        obj = BpfObject(path, pin_root_path=self.maps_dir)
        try:
            if rodata:
                self._set_rodata(obj, rodata)
            obj.load()
        except LibbpfError as e:
            obj.close()
            if "couldn't reuse pinned map" in e.log:
                reason = next(
                    line for line in e.log.splitlines() if "couldn't reuse pinned map" in line
                )
                raise IncompatiblePinnedState(str(self.pin_path), reason.strip()) from e
            raise
        return obj

    @staticmethod
    def _set_rodata(obj: BpfObject, values: dict[str, bytes]) -> None:
        rodata = next((m for m in obj.maps() if m.name.endswith(".rodata")), None)
        if rodata is None:
            raise BpfError(f"{obj.path} has no .rodata section for {sorted(values)}")
        data = bytearray(rodata.initial_value())
        for name, value in values.items():
            var = t.RODATA_VARS[name]
            if len(value) != var.size:
                raise ValueError(f"{name} is {var.size} bytes, got {len(value)}")
            data[var.offset : var.offset + var.size] = value
        rodata.set_initial_value(bytes(data))

    def _open_maps(self) -> None:
        self.close_maps()
        for name in t.MAP_SPECS:
            self.maps[name] = LibbpfMap.open_pinned(name, self.maps_dir / name)

    def _write_version_and_config(self) -> None:
        zero = struct.pack("=I", 0)
        cfg = t.ZtCfg(
            flags=t.ZT_CFG_VALID | (t.ZT_CFG_DNS_CAPTURE if self.dns_capture else 0),
            mark=self.packet_mark,
            mark_mask=self.mark_mask,
            probe_ip4=int.from_bytes(self.probe_ip4.packed, sys.byteorder) if self.probe_ip4 else 0,
        )
        if self.probe_ip6 is not None:
            fill(cfg.probe_ip6, addr16(self.probe_ip6))
        self.maps[t.MAP_CFG].update(zero, bytes(cfg))
        self.maps[t.MAP_VERSION].update(zero, bytes(t.ZtVersion(abi_version=t.ZT_ABI_VERSION)))

    def _attach_cgroup(
        self, prog: BpfProgram, attach_type: int, cgroup_fd: int, cgroup_id: int
    ) -> None:
        pin = self.cgroup_links_dir / prog.name
        if pin.exists():
            link = BpfLink.open(pin)
            try:
                info = link.info()
                if info.cgroup_id == cgroup_id and info.attach_type == attach_type:
                    link.update_program(prog)  # atomic: no moment without a program
                    return
                log.info("bpf: replacing %s (its cgroup is gone or not %s)", pin, self.cgroup_path)
                pin.unlink()
            finally:
                link.destroy()
        link = prog.attach_cgroup(cgroup_fd)
        try:
            link.pin(pin)
        finally:
            link.destroy()  # the pin keeps it attached

    # ------------------------------------------------------------------ pods

    def _pod_link_pin(self, uid: str) -> Path:
        return self._pod_link_at(pod_dir_name(uid))

    def _pod_link_at(self, dir_name: str) -> Path:
        return self.pod_links_dir / dir_name / "sk_lookup"

    def _unpin_pod_link(self, dir_name: str) -> None:
        pin = self._pod_link_at(dir_name)
        pin.unlink()  # the last reference: the kernel detaches the link
        _rmdir_if_empty(pin.parent)

    def attach_pod(self, uid: str, netns_fd: int, netns_cookie: int | None = None) -> None:
        """Attach (or refresh) the pod's sk_lookup program on its netns; idempotent."""
        cookie = netns_cookie if netns_cookie else cookie_of_netns(netns_fd)
        netns_ino = os.fstat(netns_fd).st_ino
        pin = self._pod_link_pin(uid)
        obj = self._load(
            self._object(t.PROG_SPECS[t.PROG_SK_LOOKUP].object_file),
            rodata={"zt_pod_netns_cookie": struct.pack("=Q", cookie)},
        )
        try:
            prog = obj.program(t.PROG_SK_LOOKUP)
            if pin.exists():
                link = BpfLink.open(pin)
                try:
                    if link.info().netns_ino == netns_ino:
                        link.update_program(prog)
                        return
                    pin.unlink()  # the uid's old sandbox: its netns is gone or replaced
                finally:
                    link.destroy()
            _mkdir_private(pin.parent)
            link = prog.attach_netns(netns_fd)
            try:
                link.pin(pin)
            finally:
                link.destroy()
        finally:
            obj.close()

    def detach_pod(self, uid: str) -> bool:
        """Remove the pod's sk_lookup link; ``False`` if it had none."""
        name = pod_dir_name(uid)
        existed = self._pod_link_at(name).exists()
        if existed:
            self._unpin_pod_link(name)
        else:
            _rmdir_if_empty(self.pod_links_dir / name)
        return existed

    def pinned_pods(self) -> list[str]:
        """Directory names of the pods with a pinned sk_lookup link (see ``pod_dir_name``)."""
        if not self.pod_links_dir.exists():
            return []
        return sorted(
            p.name for p in self.pod_links_dir.iterdir() if self._pod_link_at(p.name).exists()
        )

    def prune_pods(self, keep: Iterable[str]) -> list[str]:
        """Detach pods not in ``keep`` (uids); after a ZDS snapshot. Returns the removed names."""
        wanted = {pod_dir_name(uid) for uid in keep}
        removed = []
        for name in self.pinned_pods():
            if name not in wanted:
                self._unpin_pod_link(name)
                removed.append(name)
        return removed

    def _drop_stale_pod_links(self) -> None:
        for name in self.pinned_pods():
            link = BpfLink.open(self._pod_link_at(name))
            try:
                alive = link.info().netns_ino != 0
            finally:
                link.destroy()
            if not alive:
                log.info("bpf: removing the sk_lookup link of %s: its netns is gone", name)
                self._unpin_pod_link(name)

    def register_inbound_listener(self, netns_cookie: int, listener: socket.socket) -> None:
        """Make ``listener`` (the pod's :15006) the target of the pod's inbound capture."""
        self.maps[t.MAP_INBOUND_SK].update_socket(pod_key(netns_cookie), listener.fileno())

    def unregister_inbound_listener(self, netns_cookie: int) -> None:
        self.maps[t.MAP_INBOUND_SK].delete(pod_key(netns_cookie))

    # ------------------------------------------------------------------ reading

    def original_destinations(self) -> BpfOriginalDestination:
        return BpfOriginalDestination(self.maps[t.MAP_ORIG_DST])

    def read_counters(self) -> dict[str, int]:
        """Program counters summed over CPUs, by name (``out_redirected``, ...)."""
        counters = self.maps[t.MAP_COUNTERS]
        result = {}
        for index, name in sorted(COUNTER_NAMES.items()):
            try:
                slots = counters.lookup_per_cpu(struct.pack("=I", index))
            except KeyNotFound:
                slots = []
            result[name] = sum(int.from_bytes(s, "little") for s in slots)
        return result

    def attach_points(self) -> dict[str, Any]:
        """The pinned links as the kernel reports them (for /config_dump)."""
        cgroup = []
        for name in sorted(CGROUP_PROGRAMS):
            pin = self.cgroup_links_dir / name
            entry: dict[str, Any] = {"program": name, "pin": str(pin), "attached": pin.exists()}
            if pin.exists():
                info = _link_info_at(pin)
                entry |= {"linkId": info.id, "progId": info.prog_id, "cgroupId": info.cgroup_id}
            cgroup.append(entry)
        pods = []
        for name in self.pinned_pods():
            info = _link_info_at(self._pod_link_at(name))
            pods.append(
                {"pod": name, "linkId": info.id, "progId": info.prog_id, "netnsIno": info.netns_ino}
            )
        return {
            "pinPath": str(self.pin_path),
            "cgroup": str(self.cgroup_path),
            "cgroupLinks": cgroup,
            "podLinks": pods,
        }

    def dump(self) -> dict[str, Any]:
        """``/config_dump``'s BPF section: whether a previous daemon's pins were re-adopted,
        attach points and the decoded map contents."""
        return {
            "adopted": self.adopted,
            "attachPoints": self.attach_points(),
            "maps": dump_maps(self.maps),
        }

    # ------------------------------------------------------------------ teardown

    def close_maps(self) -> None:
        for m in self.maps.values():
            m.close()
        self.maps.clear()

    def close(self) -> None:
        """Drop our fds; the pinned maps and links keep the datapath running."""
        self.close_maps()

    def uninstall(self) -> None:
        """Detach every program and remove every pin (redirection stops for all pods)."""
        self.close()
        if not self.pin_path.exists():
            return
        for path in sorted(_walk_files(self.pin_path), key=lambda p: len(p.parts), reverse=True):
            path.unlink()
        for path in sorted(_walk_dirs(self.pin_path), key=lambda p: len(p.parts), reverse=True):
            path.rmdir()
        self.pin_path.rmdir()


def _link_info_at(pin: Path) -> libbpf.LinkInfo:
    fd = libbpf.obj_get(pin)
    try:
        return libbpf.link_info(fd)
    finally:
        os.close(fd)


def _walk_files(root: Path) -> Iterator[Path]:
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            yield Path(dirpath) / f


def _walk_dirs(root: Path) -> Iterator[Path]:
    for dirpath, dirs, _files in os.walk(root):
        for d in dirs:
            yield Path(dirpath) / d


def _rmdir_if_empty(path: Path) -> None:
    try:
        path.rmdir()
    except OSError as e:
        if e.errno not in {errno.ENOENT, errno.ENOTEMPTY}:
            raise


__all__ = [
    "BpfLoader",
    "Feature",
    "check_cgroup2",
    "ensure_bpffs",
    "features",
    "find_pods_cgroup",
    "probe_features",
]
