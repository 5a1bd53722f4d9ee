"""Loader housekeeping on the real kernel: feature probe, generated types, enrollment hook,
per-pod links across netns lifetimes (root)."""

from __future__ import annotations

import ipaddress
import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from ztunnel_py.bpf import _types as t
from ztunnel_py.bpf.enrollment import BpfEnrollment
from ztunnel_py.bpf.errors import IncompatiblePinnedState
from ztunnel_py.bpf.loader import BpfLoader
from ztunnel_py.bpf.probe import features, probe_features
from ztunnel_py.bpf.projection import pod_key
from ztunnel_py.errors import UnsupportedFeature
from ztunnel_py.state.model import Workload
from ztunnel_py.testing.bpf import POD_IP, POD_IP6, VIP, WAIT_S, PodEnv
from ztunnel_py.testing.privileged import require

pytestmark = [pytest.mark.root, pytest.mark.bpf]
ROOT = Path(__file__).resolve().parents[2]
ip = ipaddress.ip_address


def test_feature_probe_passes_on_this_kernel_and_names_what_is_missing(
    cgroup_parent: Path,
) -> None:
    probe_features(cgroup_parent)  # everything this module needs is in 6.x
    names = [f.name for f in features(cgroup_parent)]
    assert "bpf_sk_lookup.ingress_ifindex" in names
    assert "bpf_get_netns_cookie() in sock_ops programs" in names

    loader = BpfLoader(pin_path=Path("/sys/fs/bpf/unused"), cgroup_path=Path("/proc"))
    with pytest.raises(UnsupportedFeature, match="cgroup v2") as info:
        loader.start()
    assert "/proc is not a cgroup v2 directory" in str(info.value)


def test_generated_types_match_the_built_objects(bpf_objects: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "gen_bpf_types.py"), "--check"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr


@dataclass(frozen=True)
class Pod:
    """What the workload manager hands the enrollment hook."""

    uid: str
    netns_fd: int
    netns_cookie: int
    workload: Workload | None

    @property
    def ips(self) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, ...]:
        return self.workload.workload_ips if self.workload is not None else ()


@dataclass(frozen=True)
class Listeners:
    inbound_plaintext: socket.socket
    inbound_hbone: socket.socket  # registered only with TRANSPARENT_NETWORK_POLICIES


def test_enrollment_hook_switches_capture_on_and_off(pod_env: PodEnv) -> None:
    loader = pod_env.start_loader()
    assert pod_env.sync is not None and pod_env.outbound is not None
    assert pod_env.inbound is not None
    hook = BpfEnrollment(loader, pod_env.sync)
    pod = Pod("pod-uid-a", pod_env.pod.fd, 0, pod_env.state.workload("pod-w"))

    hook.pod_added(pod, Listeners(pod_env.inbound, pod_env.inbound))
    cookie = pod_env.sync.pods["pod-uid-a"].netns_cookie
    assert cookie > 0
    assert loader.pods.pinned() == ["pod-uid-a"]
    assert pod_key(cookie) in dict(loader.maps[t.MAP_INBOUND_SK].items())
    assert set(pod_env.sync.pods["pod-uid-a"].ips) == {ip(POD_IP), ip(POD_IP6)}
    proc = pod_env.app(VIP, 80)
    served = pod_env.serve_one(pod_env.outbound, b"pong-15001")
    assert served is not None
    served.sock.close()
    assert pod_env.result(proc)["received"] == "pong-15001"

    hook.pod_removed(pod)
    assert loader.pods.pinned() == []
    assert pod_key(cookie) not in dict(loader.maps[t.MAP_INBOUND_SK].items())
    assert dict(loader.maps[t.MAP_PODS].items()) == {}
    result = pod_env.result(pod_env.app(VIP, 80))
    # Not captured any more: the VIP is routed as is, and this test pod has no route to it.
    assert result["result"] == "error" and "unreachable" in str(result["error"])
    assert not pod_env.pending(pod_env.outbound)


def test_pod_link_of_a_deleted_netns_is_dropped_on_restart(pod_env: PodEnv) -> None:
    loader = pod_env.start_loader()
    gone = pod_env.pool.netns("gone")
    fd = os.open(f"/run/netns/{gone.name}", os.O_RDONLY)
    loader.pods.attach("gone-uid", fd)
    os.close(fd)
    gone.close()
    pod_env.pool.namespaces.remove(gone)
    subprocess.run(["ip", "netns", "del", gone.name], check=True)
    assert loader.pods.pinned() == ["gone-uid"]
    loader.close()

    # The kernel detaches netns links when the netns is destroyed (asynchronously).
    restarted = BpfLoader(
        pin_path=pod_env.pin_path, cgroup_path=pod_env.cgroup_parent, object_dir=pod_env.object_dir
    )
    pod_env.loader = restarted
    deadline = time.monotonic() + WAIT_S
    while True:
        restarted.start(probe=False)
        if restarted.pods.pinned() == [] or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert restarted.pods.pinned() == []


def test_pinned_map_with_another_layout_is_refused(pod_env: PodEnv) -> None:
    require(shutil.which("bpftool") is not None, "bpftool is not installed")
    loader = pod_env.start_loader()
    loader.close()
    # Same ABI number, different key size: as if a build changed a layout without bumping it.
    stale = pod_env.pin_path / "maps" / t.MAP_DST
    stale.unlink()
    subprocess.run(
        [
            "bpftool",
            "map",
            "create",
            str(stale),
            "type",
            "hash",
            "key",
            "8",
            "value",
            "4",
            "entries",
            "16",
            "name",
            t.MAP_DST,
            "flags",
            "1",
        ],
        check=True,
    )
    again = BpfLoader(
        pin_path=pod_env.pin_path, cgroup_path=pod_env.cgroup_parent, object_dir=pod_env.object_dir
    )
    with pytest.raises(IncompatiblePinnedState, match="couldn't reuse pinned map") as info:
        again.start(probe=False)
    assert t.MAP_DST in str(info.value)


def test_prune_pods_keeps_only_the_snapshot(pod_env: PodEnv) -> None:
    loader = pod_env.start_loader()
    loader.pods.attach("keep-me", pod_env.pod.fd)
    loader.pods.attach("drop-me", pod_env.peer.fd)
    assert loader.pods.prune(["keep-me"]) == ["drop-me"]
    assert loader.pods.pinned() == ["keep-me"]
    assert loader.pods.detach("keep-me") is True
    assert loader.pods.detach("keep-me") is False


def test_uninstall_bpf_command_removes_the_pins(pod_env: PodEnv) -> None:
    """``ztunnel-py uninstall-bpf`` detaches and unpins what a daemon left behind on purpose."""
    pod_env.start_loader()
    pod_env.enroll()
    assert (pod_env.pin_path / "maps").is_dir()
    pod_env.loader.close()  # type: ignore[union-attr]  # the daemon exits; its pins stay
    pod_env.loader = None
    argv = [
        sys.executable,
        "-m",
        "ztunnel_py",
        "uninstall-bpf",
        "--pin-path",
        str(pod_env.pin_path),
    ]
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert "removed the BPF programs and maps pinned at" in done.stdout
    assert not pod_env.pin_path.exists()
    again = subprocess.run(argv, capture_output=True, text=True, check=False)
    assert again.returncode == 0 and "nothing pinned" in again.stdout
