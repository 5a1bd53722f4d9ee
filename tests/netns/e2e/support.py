"""Helpers for the namespaced end-to-end tests: meshes of real daemons and views into them.

Everything here observes from outside the daemons: ``ss`` inside a pod's netns, the daemons'
``/config_dump``, TCP servers and clients made by this process inside the testbed's namespaces.
Waits are bounded only to turn a hang into a failure.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import secrets
import select
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from ipaddress import ip_address
from typing import Any, Protocol

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tools.testbed.mesh import CLIENT, Mesh
from ztunnel_py.hbone.headers import format_authority
from ztunnel_py.netns import run_in_netns
from ztunnel_py.testing.daemon import Daemon, http
from ztunnel_py.testing.poll import HANG_GUARD_S, wait_until

MODES = [
    pytest.param("iptables", id="iptables"),
    pytest.param("ebpf", id="ebpf", marks=pytest.mark.bpf),
]
# The testbed's IP families (tools/testbed/plan.py). The IPv4 testbed runs every test; the
# IPv6-only and dual-stack ones run each behaviour at least once per redirect mode.
FAMILIES = ("ipv4", "ipv6", "dual")
V6_FAMILIES = ("ipv6", "dual")


def mode_family_params(families: Sequence[str] = FAMILIES) -> list[Any]:
    """(redirect mode, IP family) for a module's shared mesh: every mode on every family."""
    return [
        pytest.param((mode.values[0], family), id=f"{mode.id}-{family}", marks=mode.marks)
        for mode in MODES
        for family in families
    ]


def family_tag(family: str) -> str:
    """A one-letter tag part for the family, so meshes of different families never collide."""
    return {"ipv4": "", "ipv6": "s", "dual": "d"}[family]


def hostport(ip: str, port: int) -> str:
    """``10.0.0.1:80`` / ``[fd00::1]:80``: how the daemons and clients print a socket address."""
    return format_authority(ip_address(ip), port)


def host_part(ip: str) -> str:
    """What a printed socket address of ``ip`` starts with: ``10.0.0.1:`` / ``[fd00::1]:``."""
    return f"[{ip}]:" if ":" in ip else f"{ip}:"


def node_address(mesh: Mesh, node: str, ip: str) -> str:
    """The node's address toward its pods (its bridge) in the family of ``ip``."""
    plan = mesh.plan.node(node)
    return plan.gateway6 if ":" in ip else plan.gateway


def any_address(ip: str) -> str:
    """The wildcard address of ``ip``'s family (``0.0.0.0`` / ``::``)."""
    return "::" if ":" in ip else "0.0.0.0"


PROXY_PORTS = {15001, 15006, 15008}


class MeshMaker(Protocol):
    def __call__(self, test: str, redirect: str, **options: Any) -> Mesh:
        """An up mesh with a fresh tag (``test``: up to 3 letters naming the test)."""
        ...


def mesh_tag(test: str, redirect: str, family: str = "ipv4") -> str:
    """1-8 of [a-z0-9], unique per test, mode, family and run (parallel runs never collide)."""
    if not re.fullmatch(r"[a-z]{1,3}", test):
        raise ValueError(f"test tag {test!r}: use 1-3 lower-case letters")
    return f"{test}{redirect[0]}{family_tag(family)}{secrets.token_hex(2)}"[:8]


# ----------------------------------------------------------------------------- in-pod sockets


def socket_owners(netns_path: str, *ss_args: str) -> dict[int, set[int]]:
    """Local TCP port -> pids holding the sockets that ``ss -Hntp <ss_args>`` lists in the netns."""
    proc = subprocess.run(
        ["nsenter", f"--net={netns_path}", "--", "ss", "-Hntp", *ss_args],
        capture_output=True,
        text=True,
        check=True,
        timeout=HANG_GUARD_S,
    )
    owners: dict[int, set[int]] = {}
    for line in proc.stdout.splitlines():
        fields = [f for f in line.split() if ":" in f and not f.startswith("users:")]
        if not fields:
            continue
        port = int(fields[0].rsplit(":", 1)[1])
        owners.setdefault(port, set()).update(int(p) for p in re.findall(r"pid=(\d+)", line))
    return owners


def proxy_listeners(mesh: Mesh, pod: str) -> dict[int, set[int]]:
    """The proxy ports listening inside the pod's netns -> pids of the daemons holding them."""
    listening = socket_owners(mesh.pod(pod).netns_path, "-l")
    return {port: pids for port, pids in listening.items() if port in PROXY_PORTS}


def accepted_on(mesh: Mesh, pod: str, port: int) -> set[int]:
    """Pids holding established connections whose local port (inside the pod) is ``port``."""
    return socket_owners(mesh.pod(pod).netns_path, "state", "established").get(port, set())


# ----------------------------------------------------------------------------- daemon views


def workload_state(daemon: Daemon) -> dict[str, str]:
    """``/config_dump`` ``workloadState``: pod uid -> Up | Pending."""
    return {uid: entry["state"] for uid, entry in daemon.config_dump()["workloadState"].items()}


def bpf_dump(daemon: Daemon) -> dict[str, Any]:
    bpf: dict[str, Any] = daemon.config_dump()["dataPlane"]["bpf"]
    return bpf


def netns_cookies(daemon: Daemon) -> dict[str, int]:
    """Pod IP -> the netns cookie the daemon enrolled it under (from ``zt_local``)."""
    return {e["address"]: e["netnsCookie"] for e in bpf_dump(daemon)["maps"]["zt_local"]}


def captured_cookies(daemon: Daemon) -> set[int]:
    """The netns cookies in ``zt_pods``: the pods whose connections the kernel captures."""
    return {e["netnsCookie"] for e in bpf_dump(daemon)["maps"]["zt_pods"]}


def metric_lines(daemon: Daemon, name: str) -> list[str]:
    """The daemon's samples of metric ``name`` (Prometheus text lines with labels)."""
    text = http(f"{daemon.stats}/metrics").text
    return [line for line in text.splitlines() if line.startswith(name + "{")]


class Scrape:
    """One scrape of a daemon's ``/metrics``, parsed by ``prometheus_client``'s parser."""

    def __init__(self, daemon: Daemon) -> None:
        text = http(f"{daemon.stats}/metrics").text
        self.samples: list[tuple[str, dict[str, str], float]] = [
            (sample.name, dict(sample.labels), sample.value)
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        ]

    def series(self, name: str, **labels: str) -> list[tuple[dict[str, str], float]]:
        """The samples called ``name`` (``..._total``) whose labels include ``labels``."""
        return [
            (have, value)
            for sample, have, value in self.samples
            if sample == name and labels.items() <= have.items()
        ]

    def total(self, name: str, **labels: str) -> float:
        """The sum of the samples called ``name`` whose labels include ``labels``."""
        return sum(value for _, value in self.series(name, **labels))

    def exact(self, name: str, labels: Mapping[str, str]) -> float:
        """The sample called ``name`` with exactly ``labels`` (0 when there is none)."""
        return sum(value for have, value in self.series(name) if have == dict(labels))


def receiving_from(daemon: Daemon, since: Scrape, identities: Sequence[str]) -> Callable[[], bool]:
    """A ``wait_until`` condition: ``daemon``'s inbound side has received bytes from each of
    ``identities`` since the scrape ``since`` (their streams reached the application)."""

    def check() -> bool:
        now = Scrape(daemon)
        received = "istio_tcp_received_bytes_total"
        return all(
            now.total(received, reporter="destination", source_principal=i)
            > since.total(received, reporter="destination", source_principal=i)
            for i in identities
        )

    return check


# ----------------------------------------------------------------------------- logs and config


def log_mark(daemon: Daemon) -> int:
    """Where the daemon's log ends now: pass it as ``since`` to read only what follows."""
    return len(daemon.log())


def log_records(daemon: Daemon, since: int = 0) -> list[dict[str, Any]]:
    """The daemon's JSON log records (``LOG_FORMAT=json``) written after ``since``."""
    records = []
    for line in daemon.log()[since:].splitlines():
        if line.startswith("{"):
            with contextlib.suppress(json.JSONDecodeError):  # a line still being written
                records.append(json.loads(line))
    return records


def access_records(daemon: Daemon, since: int = 0, **fields: Any) -> list[dict[str, Any]]:
    """The ``connection complete`` access-log records after ``since`` that carry ``fields``
    (keys with dots spelled with underscores: ``src_identity`` for ``src.identity``)."""
    wanted = {
        key.replace("_", ".", 1) if key.startswith(("src_", "dst_")) else key: value
        for key, value in fields.items()
    }
    return [
        r
        for r in log_records(daemon, since)
        if r.get("scope") == "access"
        and r.get("message") == "connection complete"
        and all(r.get(k) == v for k, v in wanted.items())
    ]


def only_one(find: Callable[[], list[dict[str, Any]]], what: str) -> dict[str, Any]:
    """Wait (bounded) until ``find()`` returns something; it must be exactly one record."""
    wait_until(lambda: len(find()) >= 1, what)
    records = find()
    assert len(records) == 1, records
    return records[0]


def apply_config(
    mesh: Mesh,
    policies: Sequence[Mapping[str, Any]] = (),
    *,
    selected: Mapping[str, Sequence[str]] | None = None,
) -> None:
    """Rewrite the mesh's local config (see ``Mesh.write_config``) and wait until every
    daemon has loaded it."""

    def loads() -> dict[str, int]:
        return {
            name: int(d.config_dump()["staticConfig"]["loads"]) for name, d in mesh.daemons.items()
        }

    before = loads()
    mesh.write_config(policies, selected=selected)
    wait_until(
        lambda: all(n > before[name] for name, n in loads().items()),
        "every daemon to load the new local config",
    )


# ----------------------------------------------------------------------------- TCP in a netns


def _socket_in(netns_path: str, ip: str) -> socket.socket:
    """A TCP socket of ``ip``'s family, made inside the netns."""
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    fd = os.open(netns_path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return run_in_netns(fd, lambda: socket.socket(family, socket.SOCK_STREAM))
    finally:
        os.close(fd)


def exchange(netns_path: str, ip: str, port: int, payload: bytes) -> tuple[str, bytes]:
    """Connect from a plain socket in the netns (no pod cgroup), send, half-close, read all.

    Returns (``ok`` | ``refused`` | ``reset`` | ``timeout``, what came back).
    """
    sock = _socket_in(netns_path, ip)
    sock.settimeout(10)
    try:
        sock.connect((ip, port))
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
        return "ok", data
    except ConnectionRefusedError:
        return "refused", b""
    except (ConnectionResetError, BrokenPipeError):
        return "reset", b""
    except TimeoutError:
        return "timeout", b""
    except OSError as e:
        if e.errno == errno.ENOTCONN:  # reset between our send and our half-close
            return "reset", b""
        raise
    finally:
        sock.close()


@contextlib.contextmanager
def held_connection(netns_path: str, ip: str, port: int) -> Iterator[socket.socket]:
    """An echo connection from a plain socket in the netns, kept open while the block runs
    (after one round trip, so whoever serves it has accepted it)."""
    sock = _socket_in(netns_path, ip)
    sock.settimeout(10)
    try:
        sock.connect((ip, port))
        sock.sendall(b"ping")
        assert sock.recv(64) == b"ping"
        yield sock
    finally:
        sock.close()


class NetnsServer:
    """A TCP server inside a netns (this process's socket, serving on a thread).

    Records each finished connection as (peer ip, bytes received); echoes when ``echo``;
    answers ``reply`` bytes once the client half-closes.
    """

    def __init__(
        self, netns_path: str, ip: str, port: int, *, echo: bool = False, reply: int = 0
    ) -> None:
        self.echo = echo
        self.reply = reply
        self.connections: list[tuple[str, int]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._listener = _socket_in(netns_path, ip)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind((ip, port))
        self._listener.listen(64)
        self._listener.settimeout(0.1)
        self._threads: list[threading.Thread] = []
        self._accepter = threading.Thread(target=self._accept_loop, daemon=True)
        self._accepter.start()

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                conn, peer = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return  # closed
            thread = threading.Thread(target=self._serve, args=(conn, peer[0]), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _serve(self, conn: socket.socket, peer: str) -> None:
        received = 0
        conn.settimeout(HANG_GUARD_S)
        with conn, contextlib.suppress(OSError):
            while data := conn.recv(65536):
                received += len(data)
                if self.echo:
                    conn.sendall(data)
            if self.reply:
                conn.sendall(bytes(self.reply))
        with self._lock:
            self.connections.append((peer, received))

    def seen(self) -> list[tuple[str, int]]:
        with self._lock:
            return list(self.connections)

    def clear(self) -> None:
        with self._lock:
            self.connections.clear()

    def close(self) -> None:
        self._stop.set()
        self._listener.close()
        self._accepter.join(timeout=5)
        for thread in self._threads:
            thread.join(timeout=5)

    def __enter__(self) -> NetnsServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ----------------------------------------------------------------------------- long streams


def start_stream(mesh: Mesh, pod: str, host: str, port: int) -> subprocess.Popen[str]:
    """A client streaming to the echo port until its stdin is closed; returns once connected."""
    argv = [sys.executable, str(CLIENT), "stream", host, str(port), "--until-eof"]
    proc = mesh.bed.popen(
        pod,
        argv,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], HANG_GUARD_S)
    line = proc.stdout.readline() if ready else ""
    assert json.loads(line or "{}").get("event") == "connected", (line, proc.poll())
    return proc


def finish_stream(proc: subprocess.Popen[str]) -> dict[str, Any]:
    out, err = proc.communicate(input="", timeout=HANG_GUARD_S)
    lines = [line for line in out.splitlines() if line.startswith("{")]
    assert proc.returncode == 0 and lines, err
    result: dict[str, Any] = json.loads(lines[-1])
    return result
