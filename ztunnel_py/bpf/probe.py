"""Kernel feature probes: what eBPF redirection needs, each with the kernel that has it.

``probe_features`` runs them in order and raises ``UnsupportedFeature`` naming the first one
missing, so ``REDIRECT_MODE`` unset can fall back to iptables with the reason.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ztunnel_py.bpf import libbpf
from ztunnel_py.bpf.errors import LibbpfError
from ztunnel_py.errors import UnsupportedFeature
from ztunnel_py.netns import SO_NETNS_COOKIE


@dataclass(frozen=True, slots=True)
class Feature:
    name: str
    hint: str
    check: Callable[[], bool]


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
