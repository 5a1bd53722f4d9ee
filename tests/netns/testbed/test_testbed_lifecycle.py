"""The testbed for real (root): a 2x2 cluster of namespaces, cross-node traffic, clean teardown."""

from __future__ import annotations

import secrets
import subprocess
from pathlib import Path

import pytest

from tools.testbed import Testbed, TestbedError, TestbedOptions, cgroup2_mount, make_plan
from tools.testbed.bed import _State
from ztunnel_py.redirect import iptables
from ztunnel_py.testing.privileged import require

pytestmark = [pytest.mark.root]


def host_links() -> set[str]:
    out = subprocess.run(
        ["ip", "-o", "link", "show"], capture_output=True, text=True, check=True
    ).stdout
    return {line.split(":")[1].strip().split("@")[0] for line in out.splitlines()}


def netns_names() -> set[str]:
    netns_dir = Path("/run/netns")
    return {p.name for p in netns_dir.iterdir()} if netns_dir.is_dir() else set()


def leftovers(bed: Testbed) -> list[str]:
    mount = cgroup2_mount()
    assert mount is not None
    found = [n for n in netns_names() if n.startswith(bed.plan.prefix)]
    found += [str(mount / n.cgroup) for n in bed.plan.nodes if (mount / n.cgroup).exists()]
    if bed.state_path.exists():
        found.append(str(bed.state_path))
    if bed.work_dir.exists():
        found.append(str(bed.work_dir))
    return found


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    return tmp_path / "state"


def new_bed(
    state_dir: Path,
    options: TestbedOptions | None = None,
    nodes: int = 2,
    pods: int = 2,
    ip_family: str = "ipv4",
) -> Testbed:
    require(cgroup2_mount() is not None, "a cgroup v2 mount")
    plan = make_plan(f"t{secrets.token_hex(3)}", nodes, pods, ip_family=ip_family)
    return Testbed(plan, options, state_dir=state_dir)


def addresses_in(bed: Testbed, netns: str, version: int) -> set[str]:
    out = subprocess.run(
        ["ip", "-n", netns, f"-{version}", "-o", "addr", "show", "scope", "global"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return {line.split()[3].split("/")[0] for line in out.splitlines()}


@pytest.mark.parametrize("ip_family", ["ipv6", "dual"])
def test_ipv6_and_dual_stack_pods_reach_each_other_across_nodes(
    state_dir: Path, ip_family: str
) -> None:
    bed = new_bed(state_dir, ip_family=ip_family)
    bed.up()
    try:
        for pod in bed.plan.pods:
            # Exactly the plan's addresses: no IPv4 at all on an IPv6-only testbed.
            assert addresses_in(bed, pod.netns, 6) == {pod.address(6)}
            v4 = {pod.address(4)} if ip_family == "dual" else set()
            assert addresses_in(bed, pod.netns, 4) == v4
        for src in bed.plan.pods:  # every address of every pod, across nodes, both ways
            for dst in bed.plan.pods:
                for ip in dst.addresses:
                    assert bed.http_get(src.name, ip) == f"{dst.name}\n"
        assert "fd00:10:244:1::b" in bed.config_path.read_text()
    finally:
        bed.down()
    assert leftovers(bed) == []


def test_two_by_two_reaches_across_nodes_and_tears_down_cleanly(state_dir: Path) -> None:
    links_before = host_links()
    bed = new_bed(state_dir)
    bed.up()
    try:
        assert bed.config_path.read_text().count("protocol: HBONE") == 4
        pods = bed.plan.pods
        # Every pod reaches every other pod (HTTP names the pod that answered), across nodes too.
        for src in pods:
            for dst in pods:
                assert bed.http_get(src.name, dst.ip) == f"{dst.name}\n"
        src, dst = bed.plan.pod("pod-0-0"), bed.plan.pod("pod-1-1")
        assert src.node != dst.node
        with bed.connect(src.name, dst.ip, bed.plan.echo_port) as sock:
            sock.sendall(b"across nodes")
            assert sock.recv(64) == b"across nodes"
        # Pods live in their own cgroups under the node's, where BPF programs can attach.
        mount = cgroup2_mount()
        assert mount is not None
        for pod in pods:
            assert (mount / pod.cgroup / "cgroup.procs").read_text().split(), pod.name
        probe = bed.run(src.name, ["cat", "/proc/self/cgroup"])
        assert f"/{src.cgroup}" in probe.stdout
        # Nothing in the host netns: no links were added there.
        assert host_links() == links_before
        # The same tag cannot be brought up twice.
        with pytest.raises(TestbedError, match="already up"):
            Testbed(bed.plan, state_dir=state_dir).up()
    finally:
        removed = bed.down()
    assert any(item.startswith("netns ") for item in removed)
    assert leftovers(bed) == []
    assert host_links() == links_before
    assert bed.down() == []  # idempotent


def test_a_node_of_more_than_240_pods_spans_a_wider_subnet(state_dir: Path) -> None:
    # 250 pods do not fit a /24: the last ones live in 10.244.1.x of the node's /23 and must
    # reach pods in 10.244.0.x over the same bridge (a /24 on their links would not).
    bed = new_bed(state_dir, TestbedOptions(app="none"), nodes=1, pods=250)
    bed.up()
    try:
        first, last = bed.plan.pod("pod-0-0"), bed.plan.pod("pod-0-249")
        assert (first.ip, last.ip, last.prefixlen) == ("10.244.0.10", "10.244.1.3", 23)
        with bed.pod_socket(first.name) as listener:
            listener.bind((first.ip, 7000))
            listener.listen()
            with bed.connect(last.name, first.ip, 7000) as sock:
                accepted, peer = listener.accept()
                with accepted:
                    assert peer[0] == last.ip
                    sock.sendall(b"across the /24 boundary")
                    assert accepted.recv(64) == b"across the /24 boundary"
    finally:
        bed.down()
    assert leftovers(bed) == []


def test_down_after_a_crash_removes_a_half_built_testbed(state_dir: Path) -> None:
    bed = new_bed(state_dir, TestbedOptions(app="none"))
    # Build part of it, as a process that dies half-way would, and lose the object.
    bed.state_dir.mkdir(parents=True)
    bed._state = _State(
        bed.plan.tag, bed.plan.to_dict(), {"iptables": False, "app": "none", "config_path": None}
    )
    bed._save()
    bed._build_fabric()
    bed._build_node("node-0")
    bed._build_pod("pod-0-0")
    bed._build_cgroups()
    del bed

    reloaded = Testbed.load(make_plan_tag(state_dir), state_dir=state_dir)
    assert any(n.startswith(reloaded.plan.prefix) for n in netns_names())
    reloaded.down()
    assert leftovers(reloaded) == []


def make_plan_tag(state_dir: Path) -> str:
    (tag,) = Testbed.tags(state_dir)
    return tag


def test_failed_up_cleans_up_after_itself(state_dir: Path) -> None:
    bed = new_bed(state_dir, TestbedOptions(app="none"))

    def boom(name: str) -> None:
        raise TestbedError(f"injected failure while building {name}")

    bed._build_pod = boom  # type: ignore[method-assign]
    with pytest.raises(TestbedError, match="injected failure"):
        bed.up()
    assert leftovers(bed) == []


def test_iptables_mode_installs_the_in_pod_rules(state_dir: Path) -> None:
    bed = new_bed(state_dir, TestbedOptions(iptables=True, app="none"), nodes=1, pods=2)
    bed.up()
    try:
        for pod in bed.plan.pods:
            assert iptables.is_installed(pod.netns_path)
        # With the rules in place and no ztunnel listening, pod-to-pod TCP is captured (refused).
        with pytest.raises(ConnectionRefusedError):
            bed.connect("pod-0-0", bed.plan.pod("pod-0-1").ip, 8080).close()
    finally:
        bed.down()
    assert leftovers(bed) == []
