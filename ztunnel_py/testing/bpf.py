"""BPF test support: dict-backed maps (no kernel) and a real-kernel pod environment (root).

``FakeMapOps`` behaves like ``bpf.maps.LibbpfMap`` for the reconciler: sizes come from the
generated ``_types.MAP_SPECS``, a full map raises ``MapFull``, deleting a missing key
succeeds, looking one up raises ``KeyNotFound``. Every operation is appended to a shared
``journal`` so tests can check the order of writes across maps; ``fail_on`` makes chosen
keys fail to exercise error paths.

``pod_environment()`` builds, for a root test:

    <cgroup2>/ztpy-<tag>/          the "kubepods" parent: the programs are attached here
    <cgroup2>/ztpy-<tag>/pod/      the pod's cgroup: the application joins it before connecting
    /sys/fs/bpf/ztpy-test-<tag>/   pins (unique per run)
    netns pod  10.77.0.1/24, fd00:77::1/64   --veth--   netns peer 10.77.0.2, .3, fd00:77::2, ::1:3

with the daemon's in-pod listeners (dual-stack [::]:15001 and [::]:15006) created from the
calling process (so, like the daemon's, outside the pod cgroup), and mesh state: an HBONE
workload at 10.77.0.2 behind service VIPs 10.96.0.10:80 and [fd00:96::10]:80, the pod's own
workload at 10.77.0.1 and fd00:77::1 with a DENY for sources 10.77.0.3 and fd00:77::1:0/112 on
port 8080; 10.77.0.3 and fd00:77::1:3 are outside the mesh. Everything is removed afterwards,
also when the test fails.
"""

from __future__ import annotations

import ipaddress
import json
import os
import secrets
import select
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from ztunnel_py.bpf import _types
from ztunnel_py.bpf.errors import BpfError, KeyNotFound, MapFull
from ztunnel_py.bpf.loader import BpfLoader
from ztunnel_py.bpf.mounts import cgroup2_mounts
from ztunnel_py.bpf.projection import EnrolledPod
from ztunnel_py.bpf.reconcile import MapSync, Reconciler
from ztunnel_py.netns import cookie_of_netns
from ztunnel_py.rbac.model import Action, Authorization, Match, Scope
from ztunnel_py.state.model import (
    InboundProtocol,
    NetworkAddress,
    Service,
    Workload,
    frozen_map,
)
from ztunnel_py.state.store import ProxyState, UpdateBatch
from ztunnel_py.testing.netns import NETNS_DIR, Netns, NetnsPool

Journal = list[tuple[str, str, bytes]]  # (op, map name, key)


class FakeMapOps:
    def __init__(
        self,
        name: str,
        *,
        journal: Journal | None = None,
        max_entries: int | None = None,
    ) -> None:
        spec = _types.MAP_SPECS[name]
        self.name = name
        self.key_size = spec.key_size
        self.value_size = spec.value_size
        self.max_entries = spec.max_entries if max_entries is None else max_entries
        self.entries: dict[bytes, bytes] = {}
        self.journal: Journal = journal if journal is not None else []
        self.fail_on: set[bytes] = set()

    def _check(self, key: bytes, value: bytes | None = None) -> None:
        if len(key) != self.key_size:
            raise ValueError(f"{self.name}: key is {len(key)} bytes, the map's are {self.key_size}")
        if value is not None and len(value) != self.value_size:
            raise ValueError(
                f"{self.name}: value is {len(value)} bytes, the map's are {self.value_size}"
            )
        if key in self.fail_on:
            raise BpfError(f"{self.name}: injected failure for {key.hex()}")

    def update(self, key: bytes, value: bytes) -> None:
        self._check(key, value)
        if key not in self.entries and len(self.entries) >= self.max_entries:
            raise MapFull(self.name, self.max_entries)
        self.entries[key] = value
        self.journal.append(("update", self.name, key))

    def delete(self, key: bytes) -> None:
        self._check(key)
        self.entries.pop(key, None)
        self.journal.append(("delete", self.name, key))

    def lookup(self, key: bytes) -> bytes:
        self._check(key)
        try:
            return self.entries[key]
        except KeyError:
            raise KeyNotFound(self.name, key) from None

    def items(self) -> Iterator[tuple[bytes, bytes]]:
        return iter(list(self.entries.items()))


def fake_maps(*names: str, journal: Journal | None = None) -> dict[str, FakeMapOps]:
    """One fake per map name (default: the maps the reconciler owns), sharing a journal."""
    shared: Journal = journal if journal is not None else []
    chosen = names or (
        _types.MAP_DST,
        _types.MAP_DST_CIDR,
        _types.MAP_LOCAL,
        _types.MAP_DENY,
        _types.MAP_PODS,
    )
    return {name: FakeMapOps(name, journal=shared) for name in chosen}


# ------------------------------------------------------------------------ real-kernel pods

WAIT_S = 5.0  # upper bound for things that happen at once; never a performance threshold

POD_IP, PEER_IP, OUTSIDER_IP = "10.77.0.1", "10.77.0.2", "10.77.0.3"
POD_IP6, PEER_IP6, OUTSIDER_IP6 = "fd00:77::1", "fd00:77::2", "fd00:77::1:3"
DENIED_NET6 = "fd00:77::1:0/112"  # OUTSIDER_IP6's, in the pod's DENY rule
VIP, VIP6 = "10.96.0.10", "fd00:96::10"
ip = ipaddress.ip_address


@dataclass
class Served:
    """One connection accepted by a test listener."""

    peer: tuple[str, int]
    local: tuple[str, int]
    received: bytes
    sock: socket.socket


@dataclass
class PodEnv:
    """One enrolled-pod scenario on the real kernel (see the module doc)."""

    pool: NetnsPool
    pod: Netns
    peer: Netns
    cgroup_parent: Path
    pin_path: Path
    object_dir: Path
    client_script: Path  # tests/bpf/podclient.py: the pod's application
    state: ProxyState = field(default_factory=ProxyState)
    loader: BpfLoader | None = None
    sync: MapSync | None = None
    cookie: int = 0
    outbound: socket.socket | None = None
    inbound: socket.socket | None = None
    extra: list[socket.socket] = field(default_factory=list)

    # ------------------------------------------------------------------ setup

    def start_loader(self, *, dns_capture: bool = True, ipv6: bool = True) -> BpfLoader:
        self.loader = BpfLoader(
            pin_path=self.pin_path,
            cgroup_path=self.cgroup_parent,
            object_dir=self.object_dir,
            dns_capture=dns_capture,
            ipv6=ipv6,
        )
        self.loader.start()
        self.sync = MapSync(self.state, Reconciler(self.loader.maps))
        return self.loader

    def enroll(self, *, inbound_listener: bool = True) -> None:
        """What BpfEnrollment does for the workload manager: listener, link, maps."""
        if self.loader is None or self.sync is None:
            raise RuntimeError("start_loader() first")
        self.cookie = cookie_of_netns(self.pod.fd)
        if inbound_listener:
            if self.inbound is None:
                raise RuntimeError("the :15006 listener is closed")
            self.loader.register_inbound_listener(self.cookie, self.inbound)
        self.loader.pods.attach("pod-uid-a", self.pod.fd, self.cookie)
        self.sync.enroll(EnrolledPod("pod-uid-a", self.cookie, (ip(POD_IP), ip(POD_IP6)), "pod-w"))

    def listen(self, ns: Netns, host: str, port: int) -> socket.socket:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = ns.socket(family)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind((host, port))
        sock.listen(16)
        self.extra.append(sock)
        return sock

    # ------------------------------------------------------------------ traffic

    def app(
        self,
        host: str,
        port: int,
        *,
        family: int = 4,
        mark: int = 0,
        udp: bool = False,
        connected: bool = False,
        send: str = "ping",
    ) -> subprocess.Popen[str]:
        """Start the pod's application connecting to ``host:port`` (``client_script``); with
        ``udp``, it sends one datagram (after ``connect()`` when ``connected``) and waits for
        the answer."""
        request = {
            "udp": udp,
            "connected": connected,
            "send": send,
            "cgroup": str(self.cgroup_parent / "pod"),
            "netns": str(NETNS_DIR / self.pod.name),
            "family": family,
            "host": host,
            "port": port,
            "mark": mark,
            "timeout": 3.0,
        }
        return subprocess.Popen(
            [sys.executable, str(self.client_script), json.dumps(request)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    @staticmethod
    def result(proc: subprocess.Popen[str]) -> dict[str, object]:
        out, err = proc.communicate(timeout=WAIT_S * 2)
        if proc.returncode != 0:
            raise RuntimeError(f"the pod's application failed: {err}")
        result: dict[str, object] = json.loads(out)
        return result

    def serve_one(
        self, listener: socket.socket, reply: bytes, *, wait_s: float = WAIT_S
    ) -> Served | None:
        """Accept one connection (or ``None`` when none comes), read, answer ``reply``."""
        ready, _, _ = select.select([listener], [], [], wait_s)
        if not ready:
            return None
        sock, _ = listener.accept()
        self.extra.append(sock)
        sock.settimeout(WAIT_S)
        received = sock.recv(256)
        sock.sendall(reply)
        peer, local = sock.getpeername(), sock.getsockname()
        return Served(
            peer=(str(peer[0]), int(peer[1])),
            local=(str(local[0]), int(local[1])),
            received=received,
            sock=sock,
        )

    @staticmethod
    def pending(listener: socket.socket) -> bool:
        """Whether a connection waits on ``listener`` right now."""
        ready, _, _ = select.select([listener], [], [], 0)
        return bool(ready)

    def counters(self) -> dict[str, int]:
        if self.loader is None:
            raise RuntimeError("start_loader() first")
        return self.loader.read_counters()

    # ------------------------------------------------------------------ teardown

    def close(self) -> None:
        for sock in [*self.extra, self.outbound, self.inbound]:
            if sock is not None:
                sock.close()
        if self.loader is not None:
            self.loader.uninstall()
        elif self.pin_path.exists():
            BpfLoader(
                pin_path=self.pin_path, cgroup_path=self.cgroup_parent, object_dir=self.object_dir
            ).uninstall()


def mesh_state() -> UpdateBatch:
    echo = Service(
        name="echo",
        namespace="default",
        hostname="echo.default.svc.cluster.local",
        vips=(NetworkAddress("", ip(VIP)), NetworkAddress("", ip(VIP6))),
        ports=frozen_map({80: 8080}),
    )
    server = Workload(
        uid="peer-w",
        name="peer",
        namespace="default",
        workload_ips=(ip(PEER_IP), ip(PEER_IP6)),
        protocol=InboundProtocol.HBONE,
        services=frozen_map({echo.key: frozen_map({80: 8080})}),
    )
    pod = Workload(
        uid="pod-w",
        name="pod-a",
        namespace="default",
        workload_ips=(ip(POD_IP), ip(POD_IP6)),
        protocol=InboundProtocol.HBONE,
    )
    deny = Authorization(
        name="deny-outsider",
        namespace="default",
        scope=Scope.NAMESPACE,
        action=Action.DENY,
        rules=(
            (
                (
                    Match(
                        source_ips=(
                            ipaddress.ip_network(f"{OUTSIDER_IP}/32"),
                            ipaddress.ip_network(DENIED_NET6),
                        ),
                        destination_ports=(8080,),
                    ),
                ),
            ),
        ),
    )
    return UpdateBatch(workloads=(server, pod), services=(echo,), policies=(deny,))


@contextmanager
def pods_cgroup() -> Iterator[Path]:
    """A fresh "kubepods" cgroup with a ``pod`` child under the first cgroup v2 mount."""
    roots = cgroup2_mounts()
    if not roots:
        raise RuntimeError("no cgroup v2 mount in /proc/self/mountinfo")
    parent = roots[0] / f"ztpy-{secrets.token_hex(4)}"
    parent.mkdir()
    (parent / "pod").mkdir()
    try:
        yield parent
    finally:
        for cg in (parent / "pod", parent):
            _empty_cgroup(cg)
            cg.rmdir()


def _empty_cgroup(cg: Path) -> None:
    """Stray applications (a failed test) are killed so the cgroup can be removed."""
    procs = cg / "cgroup.procs"
    if procs.exists():
        for pid in procs.read_text().split():
            try:
                os.kill(int(pid), 9)
                os.waitpid(int(pid), 0)
            except (ProcessLookupError, ChildProcessError):
                continue


@contextmanager
def pod_environment(object_dir: Path, client_script: Path) -> Iterator[PodEnv]:
    """Build the scenario of the module doc; tear all of it down afterwards."""
    pin_path = Path("/sys/fs/bpf") / f"ztpy-test-{secrets.token_hex(4)}"
    with pods_cgroup() as cgroup_parent, NetnsPool() as pool:
        env: PodEnv | None = None
        try:
            pod = pool.netns("pod")
            peer = pool.netns("peer")
            pod_if, peer_if = pool.veth_pair(pod, f"{POD_IP}/24", peer, f"{PEER_IP}/24")
            peer.sh("ip", "addr", "add", f"{OUTSIDER_IP}/24", "dev", peer_if)
            pod.sh("ip", "addr", "add", f"{POD_IP6}/64", "dev", pod_if, "nodad")
            peer.sh("ip", "addr", "add", f"{PEER_IP6}/64", "dev", peer_if, "nodad")
            peer.sh("ip", "addr", "add", f"{OUTSIDER_IP6}/64", "dev", peer_if, "nodad")
            env = PodEnv(pool, pod, peer, cgroup_parent, pin_path, object_dir, client_script)
            env.state.apply(mesh_state())
            env.outbound = env.listen(pod, "::", 15001)
            env.inbound = env.listen(pod, "::", 15006)
            env.extra.remove(env.outbound)
            env.extra.remove(env.inbound)
            yield env
        finally:
            if env is not None:
                env.close()
            elif pin_path.exists():
                BpfLoader(pin_path=pin_path, cgroup_path=cgroup_parent).uninstall()
