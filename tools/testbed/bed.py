"""Bring a testbed up and down: namespaces, links, cgroups, in-pod rules, app servers (root).

Everything the testbed creates is written to its state file (``/run/ztunnel-py-testbed/<tag>.json``)
*before* it is created, so ``down`` can undo a half-built testbed after a crash. ``down`` removes
only what the state file names (plus namespaces carrying the testbed's own ``zttb-<tag>-``
prefix), and kills only processes that sit in the testbed's own cgroups.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import errno
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from pyroute2 import NetNS, netns

from tools.testbed.plan import TestbedPlan, render_local_config
from ztunnel_py.netns import run_in_netns
from ztunnel_py.redirect import iptables

_T = TypeVar("_T")
DEFAULT_STATE_DIR = Path("/run/ztunnel-py-testbed")
NETNS_DIR = Path("/run/netns")
APPSERVER = Path(__file__).with_name("appserver.py")
APP_KINDS = ("python", "nginx", "none")
_READY_WAIT_S = 15.0


class TestbedError(RuntimeError):
    """The testbed could not be built or torn down; the message says what to do."""

    __test__ = False  # not a pytest test class, despite the name


def cgroup2_mount() -> Path | None:
    """Where the cgroup v2 hierarchy is mounted (``/sys/fs/cgroup`` or a hybrid ``.../unified``)."""
    with open("/proc/mounts") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 3 and parts[2] == "cgroup2":
                return Path(parts[1])
    return None


@dataclass
class TestbedOptions:
    __test__ = False  # not a pytest test class, despite the name

    iptables: bool = False  # install istio-cni's in-pod rules in every pod (iptables mode)
    app: str = "python"  # python | nginx | none
    config_path: str | None = None  # where to write the local config (default: state dir)
    # in-pod rules steer HBONE on application ports to :15008 (TRANSPARENT_NETWORK_POLICIES)
    transparent_hbone: bool = False

    def __post_init__(self) -> None:
        if self.app not in APP_KINDS:
            raise TestbedError(f"app={self.app!r}: use one of {', '.join(APP_KINDS)}")


@dataclass
class _State:
    tag: str
    plan: dict[str, Any]
    options: dict[str, Any]
    created: list[list[str]] = field(default_factory=list)  # [kind, name] in creation order


class Testbed:
    __test__ = False  # not a pytest test class, despite the name

    def __init__(
        self,
        plan: TestbedPlan,
        options: TestbedOptions | None = None,
        *,
        state_dir: Path = DEFAULT_STATE_DIR,
    ) -> None:
        self.plan = plan
        self.options = options or TestbedOptions()
        self.state_dir = Path(state_dir)
        self.state_path = self.state_dir / f"{plan.tag}.json"
        self.work_dir = self.state_dir / plan.tag
        self._state: _State | None = None
        self._procs: list[subprocess.Popen[Any]] = []  # app servers started by this object

    # ------------------------------------------------------------------ loading

    @classmethod
    def load(cls, tag: str, *, state_dir: Path = DEFAULT_STATE_DIR) -> Testbed:
        path = Path(state_dir) / f"{tag}.json"
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise TestbedError(f"no testbed {tag!r}: {path} does not exist") from None
        bed = cls(
            TestbedPlan.from_dict(raw["plan"]),
            TestbedOptions(**raw["options"]),
            state_dir=state_dir,
        )
        bed._state = _State(raw["tag"], raw["plan"], raw["options"], raw.get("created", []))
        return bed

    @staticmethod
    def tags(state_dir: Path = DEFAULT_STATE_DIR) -> list[str]:
        return sorted(p.stem for p in Path(state_dir).glob("*.json"))

    @property
    def config_path(self) -> Path:
        return (
            Path(self.options.config_path)
            if self.options.config_path
            else self.work_dir / "mesh.yaml"
        )

    # ------------------------------------------------------------------ up

    def up(self) -> None:
        _off_the_loop(self._up)

    def _up(self) -> None:
        if os.geteuid() != 0:
            raise TestbedError("the testbed needs root (network namespaces, cgroups)")
        if self.state_path.exists():
            raise TestbedError(
                f"testbed {self.plan.tag!r} is already up or was left over: "
                f"run `python -m tools.testbed down --tag {self.plan.tag}` first"
            )
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self._state = _State(self.plan.tag, self.plan.to_dict(), asdict(self.options))
        self._save()
        try:
            self._build()
        except BaseException:
            self.down()
            raise

    def _build(self) -> None:
        self._record("dir", str(self.work_dir))
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self._build_fabric()
        for node in self.plan.nodes:
            self._build_node(node.name)
        for pod in self.plan.pods:
            self._build_pod(pod.name)
        self._build_cgroups()
        if self.options.iptables:
            for pod in self.plan.pods:
                iptables.install(
                    pod.netns_path,
                    iptables.InpodRules(transparent_hbone=self.options.transparent_hbone),
                )
        self._record("file", str(self.config_path))
        self.config_path.parent.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(render_local_config(self.plan))
        if self.options.app != "none":
            for pod in self.plan.pods:
                self._start_app(pod.name)
            for pod in self.plan.pods:
                self._wait_listening(pod.name, self.plan.http_port)

    def _new_netns(self, name: str) -> None:
        if not name.startswith(self.plan.prefix):
            raise TestbedError(f"refusing to create {name!r}: not under {self.plan.prefix!r}")
        self._record("netns", name)
        netns.create(name)
        if 6 in self.plan.versions:
            # No duplicate address detection: IPv6 addresses are usable the moment they are
            # added (links made in this netns later inherit "default").
            for conf in ("all", "default"):
                self._sysctl(name, f"net/ipv6/conf/{conf}/accept_dad", "0")
        with NetNS(name) as ns:
            ns.link("set", index=ns.link_lookup(ifname="lo")[0], state="up")

    def _build_fabric(self) -> None:
        self._new_netns(self.plan.fabric_netns)
        with NetNS(self.plan.fabric_netns) as fab:
            fab.link("add", ifname="br0", kind="bridge")
            fab.link("set", index=fab.link_lookup(ifname="br0")[0], state="up")

    def _build_node(self, name: str) -> None:
        node = self.plan.node(name)
        self._new_netns(node.netns)
        with NetNS(self.plan.fabric_netns) as fab:
            fab.link(
                "add",
                ifname=node.fabric_ifname,
                kind="veth",
                peer={"ifname": "eth0", "net_ns_fd": node.netns},
            )
            idx = fab.link_lookup(ifname=node.fabric_ifname)[0]
            fab.link("set", index=idx, master=fab.link_lookup(ifname="br0")[0])
            fab.link("set", index=idx, state="up")
        v4, v6 = 4 in self.plan.versions, 6 in self.plan.versions
        with NetNS(node.netns) as ns:
            eth0 = ns.link_lookup(ifname="eth0")[0]
            ns.link("add", ifname="br0", kind="bridge")
            br0 = ns.link_lookup(ifname="br0")[0]
            if v4:
                ns.addr("add", index=eth0, address=node.fabric_ip, prefixlen=node.fabric_prefixlen)
                ns.addr("add", index=br0, address=node.gateway, prefixlen=node.prefixlen)
            if v6:
                ns.addr("add", index=eth0, address=node.fabric_ip6, prefixlen=64)
                ns.addr("add", index=br0, address=node.gateway6, prefixlen=64)
            ns.link("set", index=eth0, state="up")
            ns.link("set", index=br0, state="up")
            for other in self.plan.nodes:
                if other.name == node.name:
                    continue
                if v4:
                    ns.route("add", dst=other.pod_cidr, gateway=other.fabric_ip)
                if v6:
                    ns.route(
                        "add",
                        family=socket.AF_INET6,
                        dst=other.pod_cidr6,
                        gateway=other.fabric_ip6,
                    )
        if v4:
            self._sysctl(node.netns, "net/ipv4/ip_forward", "1")
        if v6:
            self._sysctl(node.netns, "net/ipv6/conf/all/forwarding", "1")

    def _build_pod(self, name: str) -> None:
        pod = self.plan.pod(name)
        node = self.plan.node(pod.node)
        self._new_netns(pod.netns)
        with NetNS(node.netns) as ns:
            ns.link(
                "add",
                ifname=pod.node_ifname,
                kind="veth",
                peer={"ifname": "eth0", "net_ns_fd": pod.netns},
            )
            idx = ns.link_lookup(ifname=pod.node_ifname)[0]
            ns.link("set", index=idx, master=ns.link_lookup(ifname="br0")[0])
            ns.link("set", index=idx, state="up")
        with NetNS(pod.netns) as ns:
            eth0 = ns.link_lookup(ifname="eth0")[0]
            for ip in pod.addresses:
                ns.addr(
                    "add", index=eth0, address=ip, prefixlen=64 if ":" in ip else node.prefixlen
                )
            ns.link("set", index=eth0, state="up")
            for ip in pod.addresses:
                if ":" in ip:
                    ns.route("add", family=socket.AF_INET6, dst="::/0", gateway=node.gateway6)
                else:
                    ns.route("add", dst="0.0.0.0/0", gateway=node.gateway)

    def _sysctl(self, netns_name: str, key: str, value: str) -> None:
        fd = os.open(NETNS_DIR / netns_name, os.O_RDONLY | os.O_CLOEXEC)
        try:
            # /proc/sys/net follows the netns of the thread that opens it.
            run_in_netns(fd, lambda: Path("/proc/sys", key).write_text(value))
        finally:
            os.close(fd)

    def _cgroup_root(self) -> Path:
        mount = cgroup2_mount()
        if mount is None:
            raise TestbedError(
                "no cgroup v2 mount in /proc/mounts: mount cgroup2 (e.g. on /sys/fs/cgroup)"
            )
        return mount

    def _build_cgroups(self) -> None:
        mount = self._cgroup_root()
        dirs = (
            [self.plan.cgroup_root]
            + [n.cgroup for n in self.plan.nodes]
            + [p.cgroup for p in self.plan.pods]
        )
        for rel in dirs:
            path = mount / rel
            if path.exists():
                continue  # the shared root, or a leftover we will reuse
            self._record("cgroup", str(path))
            path.mkdir()

    def _start_app(self, name: str) -> None:
        pod = self.plan.pod(name)
        if self.options.app == "nginx":
            argv = self._nginx_argv(pod.name)
        else:
            argv = [
                sys.executable,
                str(APPSERVER),
                "--name",
                pod.name,
                "--http",
                str(self.plan.http_port),
                "--echo",
                str(self.plan.echo_port),
            ]
        log = open(self.work_dir / f"{pod.name}.log", "ab")  # noqa: SIM115 (handed to the child)
        try:
            proc = self.popen(
                pod.name, argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        finally:
            log.close()
        self._record("pid", str(proc.pid))
        self._procs.append(proc)

    def _nginx_argv(self, name: str) -> list[str]:
        pod = self.plan.pod(name)
        root = self.work_dir / "nginx" / pod.name
        for sub in ("", "tmp"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        conf = root / "nginx.conf"
        conf.write_text(
            "daemon off;\nworker_processes 1;\nuser root;\n"
            f"pid {root}/nginx.pid;\nerror_log {root}/error.log;\n"
            "events { worker_connections 4096; }\n"
            "http {\n  access_log off;\n"
            f"  client_body_temp_path {root}/tmp/body;\n  proxy_temp_path {root}/tmp/proxy;\n"
            f"  fastcgi_temp_path {root}/tmp/fcgi;\n  uwsgi_temp_path {root}/tmp/uwsgi;\n"
            f"  scgi_temp_path {root}/tmp/scgi;\n"
            f"  server {{ listen {self.plan.http_port} reuseport backlog=4096;\n"
            f'    location / {{ return 200 "{pod.name}\\n"; }} }}\n'
            "}\n"
        )
        return ["nginx", "-c", str(conf), "-p", str(root)]

    def _wait_listening(self, name: str, port: int) -> None:
        pod = self.plan.pod(name)
        deadline = time.monotonic() + _READY_WAIT_S
        while True:
            try:
                self.connect(pod.name, pod.ip, port).close()
                return
            except OSError:
                if time.monotonic() > deadline:
                    log = self.work_dir / f"{pod.name}.log"
                    tail = log.read_text()[-500:] if log.exists() else ""
                    raise TestbedError(
                        f"the app server in {pod.name} is not listening on :{port}; "
                        f"its log: {tail!r}"
                    ) from None
                time.sleep(0.05)

    # ------------------------------------------------------------------ using it

    def popen(self, pod_name: str, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """Start ``argv`` inside the pod: its netns and its cgroup (so BPF sees it as the pod)."""
        pod = self.plan.pod(pod_name)
        procs = self._cgroup_root() / pod.cgroup / "cgroup.procs"
        # The child joins the cgroup itself (a shell, then exec): no preexec_fn, so Python
        # spawns with vfork and no fork handler of a threaded parent (gRPC) runs in the child.
        join_then_exec = 'echo $$ > "$1" && shift && exec "$@"'
        in_pod = ["nsenter", f"--net={pod.netns_path}", "--", *argv]
        return subprocess.Popen(["sh", "-c", join_then_exec, "sh", str(procs), *in_pod], **kwargs)

    def run(
        self, pod_name: str, argv: Sequence[str], *, timeout: float = 60.0
    ) -> subprocess.CompletedProcess[str]:
        proc = self.popen(pod_name, argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        out, err = proc.communicate(timeout=timeout)
        return subprocess.CompletedProcess(list(argv), proc.returncode, out, err)

    def pod_socket(self, pod_name: str, family: int = socket.AF_INET) -> socket.socket:
        """A new TCP socket that lives in ``pod_name``'s netns."""
        fd = os.open(self.plan.pod(pod_name).netns_path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            return run_in_netns(fd, lambda: socket.socket(family, socket.SOCK_STREAM))
        finally:
            os.close(fd)

    def connect(self, pod_name: str, ip: str, port: int, *, timeout: float = 5.0) -> socket.socket:
        """A TCP connection from inside ``pod_name`` (blocking socket)."""
        sock = self.pod_socket(pod_name, socket.AF_INET6 if ":" in ip else socket.AF_INET)
        sock.settimeout(timeout)
        try:
            sock.connect((ip, port))
        except BaseException:
            sock.close()
            raise
        return sock

    def http_get(self, pod_name: str, ip: str, port: int | None = None) -> str:
        """One HTTP/1.1 GET from inside ``pod_name``; the response body."""
        host = f"[{ip}]" if ":" in ip else ip
        with self.connect(pod_name, ip, port or self.plan.http_port) as sock:
            sock.sendall(f"GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 200"):
            raise TestbedError(f"GET http://{ip}:{port} from {pod_name}: {head[:80]!r}")
        return body.decode()

    def status(self) -> dict[str, Any]:
        present = {p.name for p in NETNS_DIR.iterdir()} if NETNS_DIR.is_dir() else set()
        return {
            "tag": self.plan.tag,
            "config": str(self.config_path),
            "iptables": self.options.iptables,
            "app": self.options.app,
            "ipFamily": self.plan.ip_family,
            "nodes": [
                {"name": n.name, "netns": n.netns, "podCidr": n.pod_cidr, "up": n.netns in present}
                for n in self.plan.nodes
            ],
            "pods": [
                {
                    "name": p.name,
                    "node": p.node,
                    "ip": p.ip,
                    "ips": list(p.addresses),
                    "netns": p.netns,
                    "up": p.netns in present,
                }
                for p in self.plan.pods
            ],
            "services": [
                {
                    "name": s.name,
                    "vip": s.vip,
                    "vips": list(s.vips or (s.vip,)),
                    "ipFamilies": s.ip_families,
                    "endpoints": list(s.endpoints),
                }
                for s in self.plan.services
            ],
        }

    # ------------------------------------------------------------------ down

    def down(self) -> list[str]:
        """Remove everything this testbed made; returns what was removed. Safe to repeat."""
        return _off_the_loop(self._down)

    def _down(self) -> list[str]:
        created = list(self._state.created) if self._state else []
        removed: list[str] = []
        order = {"pid": 0, "file": 1, "cgroup": 2, "netns": 3, "dir": 4}
        for kind, name in sorted(reversed(created), key=lambda kn: order.get(kn[0], 9)):
            if self._remove(kind, name):
                removed.append(f"{kind} {name}")
        for proc in self._procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)
        self._procs.clear()
        for leftover in self._own_netns_on_disk():
            _del_netns(leftover)
            removed.append(f"netns {leftover}")
        with contextlib.suppress(FileNotFoundError):
            self.state_path.unlink()
        self._state = None
        return removed

    def _own_netns_on_disk(self) -> list[str]:
        if not NETNS_DIR.is_dir():
            return []
        return sorted(p.name for p in NETNS_DIR.iterdir() if p.name.startswith(self.plan.prefix))

    def _remove(self, kind: str, name: str) -> bool:
        if kind == "pid":
            return self._kill_if_ours(int(name))
        if kind == "file":
            with contextlib.suppress(FileNotFoundError):
                Path(name).unlink()
                return True
            return False
        if kind == "cgroup":
            return _remove_cgroup(Path(name))
        if kind == "netns":
            if not name.startswith(self.plan.prefix):
                return False
            return _del_netns(name)
        if kind == "dir":
            path = Path(name)
            if path.is_dir():
                subprocess.run(["rm", "-rf", "--one-file-system", str(path)], check=False)
                return True
        return False

    def _kill_if_ours(self, pid: int) -> bool:
        try:
            cgroup = Path(f"/proc/{pid}/cgroup").read_text()
        except (FileNotFoundError, ProcessLookupError):
            return False
        if f"/{self.plan.cgroup_root}/" not in cgroup:
            return False  # the pid was reused by a process that is not ours
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        return True

    # ------------------------------------------------------------------ state file

    def _record(self, kind: str, name: str) -> None:
        assert self._state is not None
        self._state.created.append([kind, name])
        self._save()

    def _save(self) -> None:
        assert self._state is not None
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self._state), indent=1))
        tmp.replace(self.state_path)


def _off_the_loop(fn: Callable[[], _T]) -> _T:
    """Run ``fn`` here, or in a helper thread when this thread runs an asyncio loop.

    pyroute2's synchronous API drives an event loop of its own, which cannot start inside a
    running one (an async test or the demo calling ``up()``).
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return fn()
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="testbed") as pool:
        return pool.submit(fn).result()


def _del_netns(name: str) -> bool:
    if not (NETNS_DIR / name).exists():
        return False
    try:
        netns.remove(name)
    except OSError:
        subprocess.run(["ip", "netns", "del", name], check=False, capture_output=True)
    return True


def _remove_cgroup(path: Path) -> bool:
    if not path.is_dir():
        return False
    if any(p.is_dir() for p in path.iterdir()):
        return False  # a shared parent another testbed still uses
    kill = path / "cgroup.kill"
    if kill.exists():
        with contextlib.suppress(OSError):
            kill.write_text("1")
    deadline = time.monotonic() + 10.0
    while True:
        try:
            path.rmdir()
            return True
        except OSError as e:
            if e.errno == errno.ENOTEMPTY:
                return False
            if time.monotonic() > deadline:
                raise TestbedError(
                    f"cannot remove cgroup {path}: processes are still in it"
                ) from None
            time.sleep(0.02)
