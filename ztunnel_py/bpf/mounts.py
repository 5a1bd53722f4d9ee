"""The filesystems eBPF mode lives on: bpffs for the pins, cgroup v2 for the attach points."""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ztunnel_py.errors import UnsupportedFeature

log = logging.getLogger(__name__)

BPFFS_ROOT = Path("/sys/fs/bpf")
_MS_NOSUID, _MS_NODEV, _MS_NOEXEC = 2, 4, 8


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


def mkdir_private(path: Path) -> None:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path, 0o700)


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


def _walk_files(root: Path) -> Iterator[Path]:
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            yield Path(dirpath) / f


def _walk_dirs(root: Path) -> Iterator[Path]:
    for dirpath, dirs, _files in os.walk(root):
        for d in dirs:
            yield Path(dirpath) / d


def rmdir_if_empty(path: Path) -> None:
    try:
        path.rmdir()
    except OSError as e:
        if e.errno not in {errno.ENOENT, errno.ENOTEMPTY}:
            raise


def remove_tree(root: Path) -> None:
    """Remove ``root`` with every pin and directory below it (bpffs has no recursive unlink)."""
    if not root.exists():
        return
    for path in sorted(_walk_files(root), key=lambda p: len(p.parts), reverse=True):
        path.unlink()
    for path in sorted(_walk_dirs(root), key=lambda p: len(p.parts), reverse=True):
        path.rmdir()
    root.rmdir()
