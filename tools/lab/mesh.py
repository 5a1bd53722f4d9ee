"""A testbed mesh whose control plane is the real one: the lab's istiod and API server.

``LabMesh`` is ``tools.testbed.mesh.Mesh`` with three differences:

- the testbed is registered with the API server (tools/lab/cluster.py); pod index ``j`` lives in
  namespace ``namespaces[j]``, and only the ``ambient`` namespaces start labelled;
- each node's fake istio-cni agent is driven by ``LabCniController``: it enrols what the API
  server says is ambient (and installs istio-cni's in-pod rules in iptables mode);
- each daemon runs as in a cluster, with no local config: ``XDS_ADDRESS``/``CA_ADDRESS`` at
  istiod, istiod's root certificate from its ``istio-ca-root-cert`` ConfigMap, and the node's
  ztunnel pod's bound token (audience ``istio-ca``) as ``AUTH_TOKEN``.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tools.lab.cluster import LabCluster, lab_plan, ztunnel_pod_name
from tools.lab.cni import LabCniController
from tools.lab.controlplane import (
    CLUSTER_ID,
    ISTIO_NAMESPACE,
    ISTIOD_HOST,
    ControlPlane,
    LabError,
)
from tools.testbed.bed import Testbed, TestbedOptions
from tools.testbed.mesh import Mesh, MeshOptions
from ztunnel_py.testing.background import BackgroundLoop
from ztunnel_py.testing.cni_agent import FakeCniAgent

DEFAULT_NAMESPACES: Mapping[int, str] = {0: "lab-ambient", 1: "lab-ambient", 2: "lab-late"}
_ROOT_CERT_WAIT_S = 60.0


@dataclass
class LabOptions:
    tag: str = "lab"
    nodes: int = 2
    pods_per_node: int = 3
    namespaces: Mapping[int, str] = field(default_factory=lambda: dict(DEFAULT_NAMESPACES))
    ambient: Sequence[str] = ("lab-ambient",)  # namespaces labelled at start
    redirect: str = "iptables"
    app: str = "python"
    env: Mapping[str, str] = field(default_factory=dict)  # extra daemon environment


class LabMesh(Mesh):
    def __init__(self, options: LabOptions, work_dir: Path) -> None:
        super().__init__(
            MeshOptions(
                tag=options.tag,
                nodes=options.nodes,
                pods_per_node=options.pods_per_node,
                redirect=options.redirect,
                app=options.app,
                env=options.env,
            ),
            work_dir,
        )
        self.lab_options = options
        self.plan = lab_plan(options.tag, options.nodes, options.pods_per_node, options.namespaces)
        # istio-cni installs the in-pod rules when it enrols a pod, not the testbed up front.
        self.bed = Testbed(
            self.plan,
            TestbedOptions(iptables=False, app=options.app, config_path=str(self.config_path)),
            state_dir=work_dir / "testbed",
        )
        self.cp = ControlPlane(work_dir / "controlplane")
        self.cluster: LabCluster | None = None
        self.controllers: dict[str, LabCniController] = {}
        self.timings: dict[str, float] = {}

    # ------------------------------------------------------------------ bring up

    def up(self) -> None:
        start = time.monotonic()
        try:
            self.bed.up()
            self.cp.start()
            self.timings.update(self.cp.timings)
            self.cluster = LabCluster(self.cp)
            self.cluster.register(self.plan, self.lab_options.ambient)
            self._write_root_cert()
            for node in self.plan.nodes:
                self._write_token(node.name)
            self.loop = BackgroundLoop("lab-istio-cni")
            for node in self.plan.nodes:
                self._start_controller(node.name)
            for node in self.plan.nodes:
                self.start_daemon(node.name, wait="listening")
            for node in self.plan.nodes:
                self.loop.run(self.controllers[node.name].wait_synced())
            for node in self.plan.nodes:
                self.daemons[node.name].wait_ready(timeout=90)
        except BaseException:
            self.down()
            raise
        self.timings["total"] = round(time.monotonic() - start, 1)

    def _write_root_cert(self) -> None:
        deadline = time.monotonic() + _ROOT_CERT_WAIT_S
        while True:
            try:
                pem = self.cp.istiod_root_cert()
                break
            except LabError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        self.root_cert_path.write_text(pem)

    @property
    def root_cert_path(self) -> Path:
        return self.work_dir / "istio-root-cert.pem"

    def token_path(self, node_name: str) -> Path:
        return self.work_dir / "tokens" / node_name / "istio-token"

    def _write_token(self, node_name: str) -> None:
        assert self.cluster is not None
        path = self.token_path(node_name)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.cluster.ztunnel_token(node_name))
        path.chmod(0o600)

    def _start_controller(self, node_name: str) -> None:
        assert self.loop is not None and self.cluster is not None
        pods = {(p.namespace, p.name): p.netns_path for p in self.plan.pods}
        controller = LabCniController(
            node=node_name,
            agent=FakeCniAgent(self.agent_socket(node_name)),
            cluster=self.cluster,
            netns_of=lambda ns, name: pods.get((ns, name)),
            install_iptables=self.options.redirect == "iptables",
        )
        self.loop.run(controller.start())
        self.controllers[node_name] = controller
        self.agents[node_name] = controller.agent

    def daemon_env(self, node_name: str) -> dict[str, str]:
        node = self.plan.node(node_name)
        env = {
            "XDS_ADDRESS": self.cp.istiod_address,
            "CA_ADDRESS": self.cp.istiod_address,
            # istiod's serving certificate names its Service, as in a cluster.
            "ALT_XDS_HOSTNAME": ISTIOD_HOST,
            "ALT_CA_HOSTNAME": ISTIOD_HOST,
            "XDS_ROOT_CA": str(self.root_cert_path),
            "CA_ROOT_CA": str(self.root_cert_path),
            "AUTH_TOKEN": str(self.token_path(node_name)),
            "ISTIO_META_CLUSTER_ID": CLUSTER_ID,  # as the ztunnel chart sets it
            "POD_NAME": ztunnel_pod_name(node.name),
            "POD_NAMESPACE": ISTIO_NAMESPACE,
            "SERVICE_ACCOUNT": "ztunnel",
            "INSTANCE_IP": node.fabric_ip,
            **self.node_env(node_name),
        }
        env.update(self.options.env)
        return env

    # ------------------------------------------------------------------ using it

    def wait_enrolled(
        self, namespace: str, name: str, enrolled: bool = True, timeout: float = 30
    ) -> None:
        """Until the lab's istio-cni has (or no longer has) handed the pod to its daemon."""
        pod = next(p for p in self.plan.pods if p.namespace == namespace and p.name == name)
        controller = self.controllers[pod.node]
        deadline = time.monotonic() + timeout
        while True:
            assert self.loop is not None
            names = self.loop.call(
                lambda: {(e.info.namespace, e.info.name) for e in controller.enrolled.values()}
            )
            if ((namespace, name) in names) == enrolled:
                return
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{namespace}/{name}: enrolled is not {enrolled} after {timeout}s"
                )
            time.sleep(0.1)

    # ------------------------------------------------------------------ tear down

    def down(self) -> None:
        if self.loop is not None:
            for controller in self.controllers.values():
                with contextlib.suppress(Exception):
                    self.loop.run(controller.stop())
        self.controllers.clear()
        super().down()
        if self.cluster is not None:
            self.cluster.close()
            self.cluster = None
        self.cp.stop()
