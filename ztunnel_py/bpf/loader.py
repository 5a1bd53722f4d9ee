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

The parts: ``bpf.probe`` (kernel features), ``bpf.mounts`` (bpffs, cgroup v2),
``bpf.objects`` (object files against the pinned maps), ``bpf.pods`` (per-pod sk_lookup links).
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import socket
import struct
import sys
from pathlib import Path
from typing import Any

from ztunnel_py.bpf import _types as t
from ztunnel_py.bpf import libbpf
from ztunnel_py.bpf.dump import dump_maps
from ztunnel_py.bpf.errors import KeyNotFound
from ztunnel_py.bpf.libbpf import BpfLink, BpfProgram
from ztunnel_py.bpf.maps import LibbpfMap
from ztunnel_py.bpf.mounts import check_cgroup2, ensure_bpffs, mkdir_private, remove_tree
from ztunnel_py.bpf.objects import DEFAULT_OBJECT_DIR, ObjectFiles
from ztunnel_py.bpf.origdst import BpfOriginalDestination
from ztunnel_py.bpf.origsrc import BpfSpoofedSources
from ztunnel_py.bpf.pods import PodLinks, link_info_at
from ztunnel_py.bpf.probe import probe_features
from ztunnel_py.bpf.projection import addr16, fill, pod_key
from ztunnel_py.config import (
    DEFAULT_PACKET_MARK,
    PACKET_MARK_MASK,
    PROBE_IP4,
    PROBE_IP6,
    Config,
)

log = logging.getLogger(__name__)


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


class BpfLoader:
    """Owns the pinned BPF state of one node: maps, cgroup links, per-pod sk_lookup links
    (``pods``)."""

    def __init__(
        self,
        *,
        pin_path: Path,
        cgroup_path: Path,
        object_dir: Path = DEFAULT_OBJECT_DIR,
        packet_mark: int = DEFAULT_PACKET_MARK,
        mark_mask: int = PACKET_MARK_MASK,
        probe_ip4: ipaddress.IPv4Address | None = PROBE_IP4,
        probe_ip6: ipaddress.IPv6Address | None = PROBE_IP6,
        dns_capture: bool = True,
        ipv6: bool = True,
        capture_unknown: bool = False,
        transparent_hbone: bool = False,
    ) -> None:
        """``capture_unknown`` (``XDS_ON_DEMAND``): destinations the maps do not know are
        captured too, for the proxy to look up."""
        self.pin_path = pin_path
        self.dns_capture = dns_capture
        self.ipv6 = ipv6  # False (IPV6_ENABLED=false): IPv6 traffic is never captured
        self.capture_unknown = capture_unknown
        self.transparent_hbone = transparent_hbone
        self.cgroup_path = cgroup_path
        self.packet_mark = packet_mark
        self.mark_mask = mark_mask
        self.probe_ip4 = probe_ip4
        self.probe_ip6 = probe_ip6
        self.objects = ObjectFiles(object_dir, self.maps_dir, pin_path=pin_path)
        self.pods = PodLinks(pin_path / "links" / "pods", self.objects)
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
            ipv6=config.ipv6_enabled,
            capture_unknown=config.xds_on_demand,
            transparent_hbone=config.transparent_network_policies,
        )

    # ------------------------------------------------------------------ paths

    @property
    def maps_dir(self) -> Path:
        return self.pin_path / "maps"

    @property
    def cgroup_links_dir(self) -> Path:
        return self.pin_path / "links" / "cgroup"

    # ------------------------------------------------------------------ start

    def start(self, *, probe: bool = True) -> None:
        """Probe, mount, check pins, load, write config, attach or re-adopt. Idempotent."""
        check_cgroup2(self.cgroup_path)
        if probe:
            probe_features(self.cgroup_path)
        ensure_bpffs(self.pin_path)
        for d in (self.pin_path, self.maps_dir, self.cgroup_links_dir, self.pods.links_dir):
            mkdir_private(d)
        self.adopted = self.objects.pinned_version()

        programs: dict[str, BpfProgram] = {}
        objects = []
        try:
            for object_file in sorted({t.PROG_SPECS[p].object_file for p in CGROUP_PROGRAMS}):
                obj = self.objects.load(object_file)
                objects.append(obj)
                for name, spec in t.PROG_SPECS.items():
                    if spec.object_file == object_file:
                        programs[name] = obj.program(name)
            self.close_maps()
            self.maps = self.objects.open_maps()
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
        self.pods.drop_stale()
        log.info(
            "bpf: %s at %s, programs on cgroup %s",
            "re-adopted pinned maps and links" if self.adopted else "installed",
            self.pin_path,
            self.cgroup_path,
        )

    def _write_version_and_config(self) -> None:
        zero = struct.pack("=I", 0)
        flags = t.ZT_CFG_VALID
        if self.dns_capture:
            flags |= t.ZT_CFG_DNS_CAPTURE
        if self.capture_unknown:
            flags |= t.ZT_CFG_CAPTURE_UNKNOWN
        if not self.ipv6:
            flags |= t.ZT_CFG_IPV4_ONLY
        if self.transparent_hbone:
            flags |= t.ZT_CFG_TRANSPARENT_HBONE
        cfg = t.ZtCfg(
            flags=flags,
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

    def register_inbound_listener(self, netns_cookie: int, listener: socket.socket) -> None:
        """Make ``listener`` (the pod's :15006) the target of the pod's inbound capture."""
        self.maps[t.MAP_INBOUND_SK].update_socket(pod_key(netns_cookie), listener.fileno())

    def unregister_inbound_listener(self, netns_cookie: int) -> None:
        self.maps[t.MAP_INBOUND_SK].delete(pod_key(netns_cookie))

    def register_hbone_listener(self, netns_cookie: int, listener: socket.socket) -> None:
        """Make ``listener`` (the pod's :15008) the target of HBONE on application ports."""
        self.maps[t.MAP_HBONE_SK].update_socket(pod_key(netns_cookie), listener.fileno())

    def unregister_hbone_listener(self, netns_cookie: int) -> None:
        with contextlib.suppress(KeyNotFound):
            self.maps[t.MAP_HBONE_SK].delete(pod_key(netns_cookie))

    # ------------------------------------------------------------------ reading

    def original_destinations(self) -> BpfOriginalDestination:
        return BpfOriginalDestination(self.maps[t.MAP_ORIG_DST])

    def spoofed_sources(self) -> BpfSpoofedSources:
        return BpfSpoofedSources(self.maps[t.MAP_ORIG_SRC])

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
                info = link_info_at(pin)
                entry |= {"linkId": info.id, "progId": info.prog_id, "cgroupId": info.cgroup_id}
            cgroup.append(entry)
        pods = []
        for name in self.pods.pinned():
            info = self.pods.info(name)
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
        remove_tree(self.pin_path)
