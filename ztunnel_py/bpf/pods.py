"""Per-pod attachment: one sk_lookup program instance and pinned link per enrolled pod netns.

The sk_lookup program cannot ask for its netns cookie, so each pod gets its own instance with
the cookie set in ``.rodata`` before loading (``zt_pod_netns_cookie``). Links are pinned at
``<links_dir>/<pod dir>/sk_lookup``; a restarted daemon finds them and drops those whose netns
is gone.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import struct
from collections.abc import Iterable
from pathlib import Path

from ztunnel_py.bpf import _types as t
from ztunnel_py.bpf import libbpf
from ztunnel_py.bpf.libbpf import BpfLink
from ztunnel_py.bpf.mounts import mkdir_private, rmdir_if_empty
from ztunnel_py.bpf.objects import ObjectFiles
from ztunnel_py.netns import cookie_of_netns

log = logging.getLogger(__name__)

_SAFE_NAME = re.compile(r"[A-Za-z0-9_.-]{1,128}")


def pod_dir_name(uid: str) -> str:
    """A pod uid as a bpffs directory name (Kubernetes uids already are)."""
    if _SAFE_NAME.fullmatch(uid) and uid not in {".", ".."}:
        return uid
    return "uid-" + hashlib.sha256(uid.encode()).hexdigest()[:32]


class PodLinks:
    """The pinned sk_lookup links of the pods under ``links_dir``."""

    def __init__(self, links_dir: Path, objects: ObjectFiles) -> None:
        self.links_dir = links_dir
        self._objects = objects

    def link_pin(self, dir_name: str) -> Path:
        return self.links_dir / dir_name / "sk_lookup"

    def attach(self, uid: str, netns_fd: int, netns_cookie: int | None = None) -> None:
        """Attach (or refresh) the pod's sk_lookup program on its netns; idempotent."""
        cookie = netns_cookie if netns_cookie else cookie_of_netns(netns_fd)
        netns_ino = os.fstat(netns_fd).st_ino
        pin = self.link_pin(pod_dir_name(uid))
        obj = self._objects.load(
            t.PROG_SPECS[t.PROG_SK_LOOKUP].object_file,
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
            mkdir_private(pin.parent)
            link = prog.attach_netns(netns_fd)
            try:
                link.pin(pin)
            finally:
                link.destroy()
        finally:
            obj.close()

    def detach(self, uid: str) -> bool:
        """Remove the pod's sk_lookup link; ``False`` if it had none."""
        name = pod_dir_name(uid)
        existed = self.link_pin(name).exists()
        if existed:
            self._unpin(name)
        else:
            rmdir_if_empty(self.links_dir / name)
        return existed

    def pinned(self) -> list[str]:
        """Directory names of the pods with a pinned sk_lookup link (see ``pod_dir_name``)."""
        if not self.links_dir.exists():
            return []
        return sorted(p.name for p in self.links_dir.iterdir() if self.link_pin(p.name).exists())

    def prune(self, keep: Iterable[str]) -> list[str]:
        """Detach pods not in ``keep`` (uids); after a ZDS snapshot. Returns the removed names."""
        wanted = {pod_dir_name(uid) for uid in keep}
        removed = []
        for name in self.pinned():
            if name not in wanted:
                self._unpin(name)
                removed.append(name)
        return removed

    def drop_stale(self) -> None:
        """Remove the links whose netns is gone (pods deleted while no daemon ran)."""
        for name in self.pinned():
            link = BpfLink.open(self.link_pin(name))
            try:
                alive = link.info().netns_ino != 0
            finally:
                link.destroy()
            if not alive:
                log.info("bpf: removing the sk_lookup link of %s: its netns is gone", name)
                self._unpin(name)

    def info(self, name: str) -> libbpf.LinkInfo:
        return link_info_at(self.link_pin(name))

    def _unpin(self, dir_name: str) -> None:
        pin = self.link_pin(dir_name)
        pin.unlink()  # the last reference: the kernel detaches the link
        rmdir_if_empty(pin.parent)


def link_info_at(pin: Path) -> libbpf.LinkInfo:
    fd = libbpf.obj_get(pin)
    try:
        return libbpf.link_info(fd)
    finally:
        os.close(fd)
