"""Network namespaces for tests: pods and nodes on one machine (root only).

Small and explicit on purpose: a ``Netns`` wraps ``ip netns``, ``veth_pair`` wires two of them,
and ``NetnsPool`` remembers what it made so a test (or a crashed earlier run, via
``sweep_stale``) can remove everything. Every name carries a prefix so cleanup never touches
namespaces that are not ours.
"""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from ztunnel_py.netns import run_in_netns, socket_in_netns

_T = TypeVar("_T")
PREFIX = "ztpy-"
NETNS_DIR = Path("/run/netns")


def is_root() -> bool:
    return os.geteuid() == 0


def sh(
    *argv: str, check: bool = True, netns: str | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a command (optionally inside a named netns) and fail with its stderr on error."""
    full = ["ip", "netns", "exec", netns, *argv] if netns else list(argv)
    proc = subprocess.run(full, capture_output=True, text=True, check=False)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(full)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


@dataclass
class Netns:
    name: str
    _fd: int = -1

    @property
    def fd(self) -> int:
        if self._fd < 0:
            self._fd = os.open(NETNS_DIR / self.name, os.O_RDONLY)
        return self._fd

    def sh(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return sh(*argv, check=check, netns=self.name)

    def popen(self, argv: Sequence[str], **kwargs: object) -> subprocess.Popen[bytes]:
        proc: subprocess.Popen[bytes] = subprocess.Popen(  # type: ignore[call-overload]
            ["ip", "netns", "exec", self.name, *argv], **kwargs
        )
        return proc

    def run(self, fn: Callable[[], _T]) -> _T:
        """Call ``fn`` with this thread switched into the namespace."""
        return run_in_netns(self.fd, fn)

    def socket(self, family: int = socket.AF_INET, type: int = socket.SOCK_STREAM) -> socket.socket:
        return socket_in_netns(self.fd, family, type)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


@dataclass
class NetnsPool:
    """Creates namespaces and veth pairs, and removes all of them in ``cleanup``."""

    tag: str = field(default_factory=lambda: secrets.token_hex(3))
    namespaces: list[Netns] = field(default_factory=list)
    host_links: list[str] = field(default_factory=list)

    def netns(self, role: str) -> Netns:
        name = f"{PREFIX}{self.tag}-{role}"[:40]
        sh("ip", "netns", "add", name)
        ns = Netns(name)
        self.namespaces.append(ns)
        ns.sh("ip", "link", "set", "lo", "up")
        return ns

    def veth_pair(
        self,
        a: Netns | None,
        a_addr: str,
        b: Netns | None,
        b_addr: str,
        *,
        names: tuple[str, str] | None = None,
    ) -> tuple[str, str]:
        """Link ``a`` and ``b`` (``None`` = the host netns) with addresses like ``10.0.0.1/24``."""
        n = len(self.host_links) + len(self.namespaces)
        a_if, b_if = names or (f"zta{self.tag}{n}"[:15], f"ztb{self.tag}{n}"[:15])
        sh("ip", "link", "add", a_if, "type", "veth", "peer", "name", b_if)
        for ns, ifname, addr in ((a, a_if, a_addr), (b, b_if, b_addr)):
            if ns is not None:
                sh("ip", "link", "set", ifname, "netns", ns.name)
            else:
                self.host_links.append(ifname)
            run = ns.sh if ns is not None else (lambda *argv, check=True: sh(*argv, check=check))
            if addr:
                run("ip", "addr", "add", addr, "dev", ifname)
            run("ip", "link", "set", ifname, "up")
        return a_if, b_if

    def cleanup(self) -> None:
        for ns in reversed(self.namespaces):
            ns.close()
            sh("ip", "netns", "del", ns.name, check=False)
        for link in self.host_links:
            sh("ip", "link", "del", link, check=False)
        self.namespaces.clear()
        self.host_links.clear()

    def __enter__(self) -> NetnsPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.cleanup()


def sweep_stale() -> list[str]:
    """Remove namespaces left by an earlier crashed run (only ours, by prefix)."""
    removed = []
    if NETNS_DIR.is_dir():
        for entry in NETNS_DIR.iterdir():
            if entry.name.startswith(PREFIX):
                sh("ip", "netns", "del", entry.name, check=False)
                removed.append(entry.name)
    return removed
