"""A whole local mesh: the testbed's nodes and pods, one fake istio-cni agent and one real
``ztunnel-py`` process per node, the local control plane. Used by the demo, the namespaced
end-to-end tests and the benchmarks (root).

Each node's daemon runs in the host network namespace with its own admin/metrics/readiness
ports (its listeners live inside its pods' namespaces anyway, and ``ip netns exec`` would hide
the cgroup and BPF mounts from it). Every daemon reads the same local config file (the
testbed's, plus any policies the caller adds) and the same local CA directory, so all nodes
share one trust root. The fake agent plays istio-cni: it hands each pod's netns fd to its
node's daemon over ZDS.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tools.testbed.bed import Testbed, TestbedOptions, cgroup2_mount
from tools.testbed.plan import (
    ECHO_PORT,
    HTTP_PORT,
    NAMESPACE,
    SERVICE_HTTP_PORT,
    NodePlan,
    PodPlan,
    local_config,
    make_plan,
)
from ztunnel_py.redirect import iptables
from ztunnel_py.testing.background import BackgroundLoop
from ztunnel_py.testing.cni_agent import FakeCniAgent
from ztunnel_py.testing.daemon import Daemon, run_daemon

CLIENT = Path(__file__).with_name("client.py")
BPF_PIN_ROOT = Path("/sys/fs/bpf")
_PORT_RACE_RETRIES = 2


@dataclass(frozen=True)
class ExtraService:
    """A service beyond the testbed's own, e.g. one whose only endpoints sit on one node."""

    name: str
    vip: str  # "" for a headless service
    endpoints: tuple[str, ...]  # pod names
    ports: Mapping[int, int] = field(
        default_factory=lambda: {SERVICE_HTTP_PORT: HTTP_PORT, ECHO_PORT: ECHO_PORT}
    )
    namespace: str = NAMESPACE
    host: str = ""  # a ServiceEntry's host; default: the Kubernetes service name

    @property
    def hostname(self) -> str:
        return self.host or f"{self.name}.{self.namespace}.svc.cluster.local"

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.hostname}"


@dataclass
class MeshOptions:
    tag: str = "mesh"
    nodes: int = 2
    pods_per_node: int = 2
    redirect: str = "iptables"  # iptables | ebpf
    app: str = "python"  # the testbed's app server (python | nginx)
    policies: Sequence[Mapping[str, Any]] = ()  # local-config policies to add
    services: Sequence[ExtraService] = ()  # services to add to the testbed's
    workloads: Sequence[Mapping[str, Any]] = ()  # local-config workloads beyond the pods
    env: Mapping[str, str] = field(default_factory=dict)  # extra daemon environment
    node_env: Mapping[str, Mapping[str, str]] = field(default_factory=dict)  # node -> env
    # Pod name -> local-config fields merged into its workload (e.g. ``network`` and
    # ``networkGateway`` for a multi-network mesh).
    workload_fields: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    # Pods left out of the mesh, like pods of a namespace without the ambient label: not in
    # the local config, never enrolled, no in-pod rules. Traffic to them is non-mesh traffic.
    outside: Sequence[str] = ()
    # istio-cni's in-pod iptables rules in every mesh pod: always in iptables mode; in eBPF
    # mode only when asked (a stock istio-cni installs them whatever the node proxy does).
    inpod_rules: bool = False
    # Nodes whose daemon the caller runs itself (e.g. in a container); the mesh still builds
    # their pods and agent. ``agent_sockets``: node -> where its agent listens, if not the default.
    external: Sequence[str] = ()
    agent_sockets: Mapping[str, str] = field(default_factory=dict)

    @property
    def iptables_rules(self) -> bool:
        return self.redirect == "iptables" or self.inpod_rules


class Mesh:
    def __init__(self, options: MeshOptions, work_dir: Path) -> None:
        if options.redirect not in {"iptables", "ebpf"}:
            raise ValueError(f"redirect={options.redirect!r}: use iptables or ebpf")
        self.options = options
        self.work_dir = work_dir
        self.plan = make_plan(options.tag, options.nodes, options.pods_per_node)
        for name in options.outside:
            self.plan.pod(name)  # a KeyError that names the pods there are
        self.config_path = work_dir / "mesh.yaml"
        self.bed = Testbed(
            self.plan,
            TestbedOptions(
                iptables=options.iptables_rules,
                app=options.app,
                config_path=str(self.config_path),
            ),
            state_dir=work_dir / "testbed",
        )
        self.loop: BackgroundLoop | None = None
        self.agents: dict[str, FakeCniAgent] = {}
        self.daemons: dict[str, Daemon] = {}  # the newest daemon of each node
        self._daemon_stacks: dict[int, contextlib.ExitStack] = {}  # by pid, every daemon

    # ------------------------------------------------------------------ bring up

    def up(self) -> None:
        try:
            self.bed.up()
            if self.options.iptables_rules:
                for name in self.options.outside:
                    iptables.remove(self.pod(name).netns_path)
            self.write_config(self.options.policies)
            self.loop = BackgroundLoop("fake-istio-cni")
            for node in self.plan.nodes:
                self._start_agent(node)
            own = [node.name for node in self.plan.nodes if node.name not in self.options.external]
            for name in own:
                self.start_daemon(name, wait="listening")
            for name in own:
                self.daemons[name].wait_ready()
        except BaseException:
            self.down()
            raise

    def _start_agent(self, node: NodePlan) -> None:
        assert self.loop is not None
        agent = FakeCniAgent(self.agent_socket(node.name))
        self.loop.run(agent.start())
        for pod in self.plan.pods_on(node.name):
            if pod.name in self.options.outside:
                continue
            self.loop.run(agent.add_pod(pod.uid, pod.workload_info, pod.netns_path))
        self.agents[node.name] = agent

    def daemon_env(self, node_name: str) -> dict[str, str]:
        env = {
            "LOCAL_XDS_PATH": str(self.config_path),
            "LOCAL_CA_DIR": str(self.work_dir / "ca"),
            **self.node_env(node_name),
        }
        env.update(self.options.env)
        env.update(self.options.node_env.get(node_name, {}))
        return env

    def node_env(self, node_name: str) -> dict[str, str]:
        """The daemon environment that does not depend on the control plane: the node, its
        agent's socket, the redirect mode (and in eBPF mode the node's cgroup and pin path)."""
        node = self.plan.node(node_name)
        env = {
            "NODE_NAME": node.name,
            "INPOD_UDS": str(self.agent_socket(node.name)),
            "REDIRECT_MODE": self.options.redirect,
            "CONNECTION_TERMINATION_DEADLINE": "3s",
        }
        if self.options.redirect == "ebpf":
            mount = cgroup2_mount()
            assert mount is not None, "the testbed made cgroups, so a cgroup v2 mount exists"
            env["BPF_CGROUP_PATH"] = str(mount / node.cgroup)
            env["BPF_PIN_PATH"] = str(self.bpf_pin_path(node.name))
        return env

    def agent_socket(self, node_name: str) -> Path:
        """Where the node's fake istio-cni agent serves ZDS."""
        path = self.options.agent_sockets.get(node_name)
        return Path(path) if path else self.work_dir / f"{node_name}.sock"

    def bpf_pin_path(self, node_name: str) -> Path:
        return BPF_PIN_ROOT / f"ztunnel-py-{self.plan.prefix}{node_name}"

    def start_daemon(self, node_name: str, *, wait: str = "ready") -> Daemon:
        """Start a daemon for the node; it becomes ``daemons[node_name]``. A daemon already
        running for the node keeps running (an upgrade: the new one binds beside it)."""
        for attempt in range(_PORT_RACE_RETRIES + 1):
            stack = contextlib.ExitStack()
            try:
                daemon = stack.enter_context(
                    run_daemon(
                        self.daemon_env(node_name), log_dir=self.work_dir / "logs", wait=wait
                    )
                )
                break
            except RuntimeError as e:
                stack.close()
                # Its admin/metrics/readiness ports were free when picked; another process
                # may have taken one since. Anything else is the daemon's own failure.
                if "address already in use" not in str(e) or attempt == _PORT_RACE_RETRIES:
                    raise
        self.daemons[node_name] = daemon
        self._daemon_stacks[daemon.proc.pid] = stack
        return daemon

    def stop_daemon(
        self,
        node_name: str,
        *,
        signum: int | None = signal.SIGTERM,
        daemon: Daemon | None = None,
        timeout: float = 30,
    ) -> int:
        """Signal the node's daemon (or ``daemon``, an older one; ``signum=None``: it was
        signalled already) and wait for it to exit; returns its exit code."""
        if daemon is None or self.daemons.get(node_name) is daemon:
            daemon = self.daemons.pop(node_name)
        if signum is not None:
            daemon.signal(signum)
        code = daemon.wait(timeout=timeout)
        self._daemon_stacks.pop(daemon.proc.pid).close()
        return code

    # ------------------------------------------------------------------ using it

    def pod(self, name: str) -> PodPlan:
        return self.plan.pod(name)

    def client(
        self, pod: str, mode: str, host: str, port: int, *args: str, timeout: float = 60
    ) -> dict[str, Any]:
        """Run the pod client (``tools/testbed/client.py``) inside ``pod``; its JSON result."""
        argv = [sys.executable, str(CLIENT), mode, host, str(port), *args]
        proc = self.bed.run(pod, argv, timeout=timeout)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
        if proc.returncode != 0 or not lines:
            raise RuntimeError(f"client in {pod} failed ({proc.returncode}): {proc.stderr}")
        result: dict[str, Any] = json.loads(lines[-1])
        return result

    def write_config(
        self,
        policies: Sequence[Mapping[str, Any]] = (),
        *,
        selected: Mapping[str, Sequence[str]] | None = None,
    ) -> None:
        """(Re)write the local config every daemon watches: the testbed mesh plus ``policies``.

        ``selected``: pod name -> keys (``namespace/name``) of the ``WorkloadSelector``
        policies that select it (its workload's ``authorizationPolicies``).
        """
        doc = local_config(self.plan)
        doc["policies"] = [dict(p) for p in policies]
        doc["workloads"] = [w for w in doc["workloads"] if w["name"] not in self.options.outside]
        by_name = {w["name"]: w for w in doc["workloads"]}
        for pod_name, keys in (selected or {}).items():
            by_name[pod_name]["authorizationPolicies"] = list(keys)
        for pod_name, fields in self.options.workload_fields.items():
            by_name[pod_name].update(fields)
        for svc in self.options.services:
            doc["services"].append(
                {
                    "name": svc.name,
                    "namespace": svc.namespace,
                    "hostname": svc.hostname,
                    "vips": [f"/{svc.vip}"] if svc.vip else [],
                    "ports": dict(svc.ports),
                    "subjectAltNames": sorted({self.pod(p).identity for p in svc.endpoints}),
                }
            )
            for pod_name in svc.endpoints:
                by_name[pod_name]["services"][svc.key] = dict(svc.ports)
        doc["workloads"] += [dict(w) for w in self.options.workloads]
        tmp = self.config_path.with_suffix(".tmp")
        tmp.write_text(yaml.safe_dump(doc, sort_keys=False))
        os.replace(tmp, self.config_path)

    # ------------------------------------------------------------------ tear down

    def down(self) -> None:
        self.daemons.clear()
        for stack in self._daemon_stacks.values():
            with contextlib.suppress(OSError, subprocess.TimeoutExpired):
                stack.close()  # kills the daemon if it still runs
        self._daemon_stacks.clear()
        if self.loop is not None:
            for agent in self.agents.values():
                with contextlib.suppress(Exception):
                    self.loop.run(agent.stop())
            self.loop.close()
            self.loop = None
        self.agents.clear()
        if self.options.redirect == "ebpf":
            self._remove_bpf()
        self.bed.down()

    def _remove_bpf(self) -> None:
        """Daemons leave their programs pinned on purpose (fail closed); a test mesh does not."""
        from ztunnel_py.bpf.loader import BpfLoader  # eBPF meshes only: it loads libbpf

        mount = cgroup2_mount()
        for node in self.plan.nodes:
            pin = self.bpf_pin_path(node.name)
            if pin.exists() and mount is not None:
                BpfLoader(pin_path=pin, cgroup_path=mount / node.cgroup).uninstall()

    def __enter__(self) -> Mesh:
        self.up()
        return self

    def __exit__(self, *exc: object) -> None:
        self.down()
