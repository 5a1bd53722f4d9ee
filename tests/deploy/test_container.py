"""The image, started exactly as the rendered DaemonSet starts it, on a testbed node.

Istio's ztunnel chart is rendered with our overlays plus what a node would differ in (the
local control plane's config and CA instead of istiod's, this test's BPF pin and cgroup), and
the DaemonSet's container runs under podman with its env, args, mounts, capabilities, user and
read-only root (tools/k8s/podrun.py). node-0's daemon is that container; node-1's is a plain
process; the fake istio-cni agent hands node-0's pods to the container over ZDS through the
chart's hostPath /var/run/ztunnel. Every mesh pod carries istio-cni's in-pod iptables rules, in
eBPF mode too, as a stock istio-cni leaves them.

- in both redirect modes it gets ready and carries traffic out of and into node-0's pods;
- killed (SIGKILL) and started again: while it is down nothing reaches the destination in
  plaintext; the new container re-adopts the pinned maps (eBPF) and re-enrols the pods from the
  agent's snapshot, and traffic flows again.
"""

from __future__ import annotations

import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.container import PodContainer, built_image, pod_container
from tests.deploy.support import EBPF_VALUES, IPTABLES_VALUES, load_values, render
from tests.netns.e2e.support import NetnsServer, mesh_tag
from tools.k8s.podrun import PODMAN_RUN, ULIMITS, Node
from tools.testbed import cgroup2_mount
from tools.testbed.mesh import ExtraService, Mesh, MeshOptions
from ztunnel_py.testing.poll import HANG_GUARD_S, wait_until
from ztunnel_py.testing.privileged import require

# The first test may build the image (minutes when the Debian base is not cached yet).
pytestmark = [pytest.mark.root, pytest.mark.timeout(900)]

ON_NODE_1 = ExtraService("only-n1", "10.96.0.101", ("pod-1-1",))
ON_NODE_0 = ExtraService("only-n0", "10.96.0.100", ("pod-0-1",))
MODES = [
    pytest.param("iptables", id="iptables"),
    pytest.param("ebpf", id="ebpf", marks=pytest.mark.bpf),
]
RECORDER_PORT = 7777
NODE = "node-0"


@pytest.fixture(scope="module")
def image() -> str:
    return built_image()


class ContainerNode:
    """A mesh whose node-0 daemon is the chart's container."""

    def __init__(self, mode: str, image: str, work: Path) -> None:
        require(cgroup2_mount() is not None, "a cgroup v2 mount (testbed pods live in cgroups)")
        # The node's /var/run/ztunnel: short, so the socket path fits in sun_path.
        self.zds_dir = Path(tempfile.mkdtemp(prefix="ztpy-deploy-"))
        self.mode = mode
        self.image = image
        self.work = work
        self.mesh = Mesh(
            MeshOptions(
                tag=mesh_tag("ct", mode),
                redirect=mode,
                inpod_rules=True,  # a stock istio-cni installs them in eBPF mode too
                services=(ON_NODE_1, ON_NODE_0),
                external=(NODE,),
                agent_sockets={NODE: str(self.zds_dir / "ztunnel.sock")},
            ),
            work / "mesh",
        )
        self.started = 0

    def values(self) -> Path:
        """The test's values on top of the overlays: where this node differs from a cluster."""
        mesh = self.mesh
        overlay = load_values(EBPF_VALUES[-1]) if self.mode == "ebpf" else {}
        env = {
            # Later entries win (the kubelet's rule, and podman's): no istiod here, the local
            # control plane instead.
            "XDS_ADDRESS": "",
            "CA_ADDRESS": "",
            "LOCAL_XDS_PATH": str(mesh.config_path),
            "LOCAL_CA_DIR": str(mesh.work_dir / "ca"),
            "CONNECTION_TERMINATION_DEADLINE": "3s",
        }
        if self.mode == "ebpf":
            mount = cgroup2_mount()
            assert mount is not None
            # The chart mounts the node's /sys/fs/cgroup at /host/sys/fs/cgroup.
            cgroup = Path("/host/sys/fs/cgroup") / mount.relative_to("/sys/fs/cgroup")
            env["BPF_CGROUP_PATH"] = str(cgroup / mesh.plan.node(NODE).cgroup)
            env["BPF_PIN_PATH"] = str(mesh.bpf_pin_path(NODE))
        work = {"name": "test-work", "hostPath": {"path": str(mesh.work_dir), "type": "Directory"}}
        values: dict[str, Any] = {
            "image": self.image,
            "env": env,
            "volumes": [*overlay.get("volumes", []), work],
            "volumeMounts": [
                *overlay.get("volumeMounts", []),
                {"name": "test-work", "mountPath": str(mesh.work_dir)},
            ],
        }
        path = self.work / "test-values.yaml"
        path.write_text(yaml.safe_dump(values))
        return path

    def docs(self) -> list[dict[str, Any]]:
        overlays = EBPF_VALUES if self.mode == "ebpf" else IPTABLES_VALUES
        return render((*overlays, self.values()))

    def node(self) -> Node:
        files = self.work / "volumes"
        (files / "ca").mkdir(parents=True, exist_ok=True)
        (files / "token").mkdir(parents=True, exist_ok=True)
        roots = sorted((self.mesh.work_dir / "ca").glob("*.pem"))
        (files / "ca" / "root-cert.pem").write_bytes(roots[0].read_bytes() if roots else b"")
        (files / "token" / "istio-token").write_text("not-used-in-local-mode")
        return Node(
            downward={
                "metadata.name": "ztunnel-test",
                "metadata.namespace": "istio-system",
                "spec.nodeName": NODE,
                "status.podIP": "127.0.0.1",
                "spec.serviceAccountName": "ztunnel",
                "limits.cpu": "2",
                "requests.cpu": "1",
            },
            host_paths={"/var/run/ztunnel": self.zds_dir},
            volume_files={"istiod-ca-cert": files / "ca", "istio-token": files / "token"},
        )

    def start(self, docs: list[dict[str, Any]]) -> Any:
        self.started += 1
        name = f"ztpy-deploy-{self.mesh.plan.tag}-{self.started}-{secrets.token_hex(2)}"
        return pod_container(docs, name=name, node=self.node(), log_dir=self.work / "logs")

    def down(self) -> None:
        self.mesh.down()
        shutil.rmtree(self.zds_dir, ignore_errors=True)


@pytest.fixture
def container_node(
    image: str, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[ContainerNode]:
    node = ContainerNode(request.param, image, tmp_path)
    try:
        node.mesh.up()
        yield node
    finally:
        node.down()


def echo(mesh: Mesh, pod: str, host: str, port: int) -> dict[str, Any]:
    return mesh.client(pod, "echo", host, port, "--bytes", "20000")


def assert_serves(node: ContainerNode, container: PodContainer) -> None:
    mesh = node.mesh
    dump = container.config_dump()
    assert dump["dataPlane"]["redirectMode"] == node.mode
    states = {uid: e["state"] for uid, e in dump["workloadState"].items()}
    assert states == {p.uid: "Up" for p in mesh.plan.pods_on(NODE)}
    for pod, vip in (("pod-0-0", ON_NODE_1.vip), ("pod-1-0", ON_NODE_0.vip)):  # out of, into
        result = echo(mesh, pod, vip, 9000)
        assert (result["result"], result["received"]) == ("ok", 20000), result


@pytest.mark.parametrize("container_node", MODES, indirect=True)
def test_the_chart_container_gets_ready_and_carries_traffic(container_node: ContainerNode) -> None:
    with container_node.start(container_node.docs()) as container:
        container.wait_ready()
        assert_serves(container_node, container)
        assert 'istio_build{component="ztunnel",tag="ztunnel-py-' in container.metrics()


@pytest.mark.parametrize("container_node", MODES, indirect=True)
def test_killed_container_fails_closed_and_its_successor_recovers(
    container_node: ContainerNode,
) -> None:
    node = container_node
    mesh = node.mesh
    docs = node.docs()
    target = mesh.pod("pod-1-1")
    agent, loop = mesh.agents[NODE], mesh.loop
    assert loop is not None
    with NetnsServer(target.netns_path, "0.0.0.0", RECORDER_PORT) as recorder:
        with node.start(docs) as first:
            first.wait_ready()
            before = first.config_dump()["dataPlane"]
            sent = echo(mesh, "pod-0-0", target.ip, RECORDER_PORT)
            assert sent["result"] == "ok", sent
            wait_until(lambda: [n for _, n in recorder.seen()] == [20000], "the recorder")
            recorder.clear()

            assert first.kill() != 0
            loop.run(agent.wait_disconnected(), timeout=HANG_GUARD_S)
            # Down: the pod's connections are still captured, to nobody: refused.
            for host, port in ((ON_NODE_1.vip, 9000), (target.ip, RECORDER_PORT)):
                refused = echo(mesh, "pod-0-0", host, port)
                assert refused["result"] == "refused", refused
            assert recorder.seen() == []  # not a byte left in plaintext
            if node.mode == "ebpf":
                assert (mesh.bpf_pin_path(NODE) / "maps" / "zt_pods").exists()

        with node.start(docs) as second:
            second.wait_ready()
            after = second.config_dump()["dataPlane"]
            if node.mode == "ebpf":
                assert not before["bpf"]["adopted"]
                assert after["bpf"]["adopted"]  # the pinned maps and links of the first
                assert after["bpf"]["maps"]["zt_pods"] == before["bpf"]["maps"]["zt_pods"]
            assert agent.snapshots_acked >= 2  # the pods came back from the agent's snapshot
            assert_serves(node, second)
            sent = echo(mesh, "pod-0-0", target.ip, RECORDER_PORT)
            assert sent["result"] == "ok", sent
            wait_until(lambda: [n for _, n in recorder.seen()] == [20000], "the recorder")


def test_the_image_has_every_command_the_daemon_runs(image: str) -> None:
    """The daemon shells out inside pods' netns for ENABLE_ORIG_SRC in eBPF mode (nsenter, then
    ip and sysctl: redirect/origsrc.py); a minimal base without them fails that pod."""
    for argv in (["nsenter", "--version"], ["ip", "-V"], ["sysctl", "--version"]):
        out = subprocess.run(
            [*PODMAN_RUN, *ULIMITS, "--rm", "--entrypoint", argv[0], image, *argv[1:]],
            capture_output=True,
            text=True,
            check=False,
            timeout=HANG_GUARD_S,
        )
        assert out.returncode == 0, f"{argv[0]} in the image: {out.stderr.strip()}"
