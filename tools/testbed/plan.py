"""The testbed's address plan and its ztunnel local-config, as pure data (no I/O).

N nodes with M pods each. Every name carries the prefix ``zttb-<tag>-`` so the testbed only
ever touches what it made:

- node ``i``: netns ``zttb-<tag>-n<i>``, a bridge ``br0`` at ``10.244.<i>.1/24`` (the pods'
  gateway), and ``eth0`` at ``192.168.244.<i+1>/24`` on the fabric;
- pod ``j`` of node ``i``: netns ``zttb-<tag>-n<i>p<j>``, ``eth0`` at ``10.244.<i>.<10+j>/24``,
  its peer ``p<j>`` on the node's bridge; cgroup ``ztunnel-py-testbed/<node netns>/<pod>``;
- the fabric: netns ``zttb-<tag>-fab`` with a bridge that links the nodes' ``eth0``s; each node
  routes the other nodes' pod subnets via their fabric addresses;
- services: ``app-<j>`` (VIP ``10.96.0.<10+j>``) groups pod ``j`` of every node, so each has
  endpoints on all nodes; ``echo`` (VIP ``10.96.0.2``) has every pod.

Addresses exist only inside the namespaces; the host netns gets nothing.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import asdict, dataclass, field
from typing import Any

import yaml

from ztunnel_py.config import WorkloadInfo

PREFIX = "zttb-"
CGROUP_ROOT = "ztunnel-py-testbed"
HTTP_PORT = 8080
ECHO_PORT = 9000
SERVICE_HTTP_PORT = 80
NAMESPACE = "default"
MAX_NODES = 200
MAX_PODS_PER_NODE = 240  # pod host parts 10..249
_TAG = re.compile(r"^[a-z0-9]{1,8}$")


class PlanError(ValueError):
    """The requested testbed cannot be laid out; the message says which parameter to change."""


@dataclass(frozen=True, slots=True)
class NodePlan:
    name: str  # the Kubernetes-style node name in the config (node-0)
    index: int
    netns: str
    pod_cidr: str
    gateway: str  # the bridge address, the pods' default route
    fabric_ip: str
    fabric_prefixlen: int
    fabric_ifname: str  # the node's link on the fabric bridge (in the fabric netns)
    cgroup: str  # relative to the cgroup2 mount


@dataclass(frozen=True, slots=True)
class PodPlan:
    name: str
    namespace: str
    service_account: str
    app: str
    node: str
    node_index: int
    index: int
    uid: str
    ip: str
    prefixlen: int
    gateway: str
    netns: str
    node_ifname: str  # the pod's veth peer, on the node's bridge
    cgroup: str

    @property
    def netns_path(self) -> str:
        return f"/run/netns/{self.netns}"

    @property
    def identity(self) -> str:
        return f"spiffe://cluster.local/ns/{self.namespace}/sa/{self.service_account}"

    @property
    def workload_info(self) -> WorkloadInfo:
        """What istio-cni's ``AddWorkload`` says about this pod."""
        return WorkloadInfo(
            namespace=self.namespace, name=self.name, service_account=self.service_account
        )


@dataclass(frozen=True, slots=True)
class ServicePlan:
    name: str
    namespace: str
    vip: str
    ports: dict[int, int]  # service port -> target port
    endpoints: tuple[str, ...]  # pod names

    @property
    def hostname(self) -> str:
        return f"{self.name}.{self.namespace}.svc.cluster.local"

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.hostname}"


@dataclass(frozen=True, slots=True)
class TestbedPlan:
    __test__ = False  # not a pytest test class, despite the name

    tag: str
    nodes: tuple[NodePlan, ...]
    pods: tuple[PodPlan, ...]
    services: tuple[ServicePlan, ...]
    fabric_netns: str
    cluster_id: str = "Kubernetes"
    http_port: int = HTTP_PORT
    echo_port: int = ECHO_PORT
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def prefix(self) -> str:
        return f"{PREFIX}{self.tag}-"

    @property
    def cgroup_root(self) -> str:
        return CGROUP_ROOT

    def pod(self, name: str) -> PodPlan:
        for pod in self.pods:
            if pod.name == name:
                return pod
        raise KeyError(
            f"no pod {name!r} in testbed {self.tag!r} (have {', '.join(self.pod_names())})"
        )

    def pod_names(self) -> list[str]:
        return [p.name for p in self.pods]

    def pods_on(self, node: str) -> list[PodPlan]:
        return [p for p in self.pods if p.node == node]

    def node(self, name: str) -> NodePlan:
        for node in self.nodes:
            if node.name == name:
                return node
        raise KeyError(f"no node {name!r} in testbed {self.tag!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TestbedPlan:
        return cls(
            tag=data["tag"],
            nodes=tuple(NodePlan(**n) for n in data["nodes"]),
            pods=tuple(PodPlan(**p) for p in data["pods"]),
            services=tuple(
                ServicePlan(
                    name=s["name"],
                    namespace=s["namespace"],
                    vip=s["vip"],
                    ports={int(k): int(v) for k, v in s["ports"].items()},
                    endpoints=tuple(s["endpoints"]),
                )
                for s in data["services"]
            ),
            fabric_netns=data["fabric_netns"],
            cluster_id=data.get("cluster_id", "Kubernetes"),
            http_port=data.get("http_port", HTTP_PORT),
            echo_port=data.get("echo_port", ECHO_PORT),
            extra=data.get("extra", {}),
        )


def make_plan(
    tag: str = "tb",
    nodes: int = 2,
    pods_per_node: int = 2,
    *,
    pod_supernet: str = "10.244.0.0/16",
    fabric_cidr: str = "192.168.244.0/24",
    service_cidr: str = "10.96.0.0/24",
    cluster_id: str = "Kubernetes",
) -> TestbedPlan:
    if not _TAG.match(tag):
        raise PlanError(f"tag {tag!r}: use 1-8 lower-case letters or digits")
    if not 1 <= nodes <= MAX_NODES:
        raise PlanError(f"nodes={nodes}: use 1..{MAX_NODES}")
    if not 1 <= pods_per_node <= MAX_PODS_PER_NODE:
        raise PlanError(f"pods_per_node={pods_per_node}: use 1..{MAX_PODS_PER_NODE}")
    supernet = _network(pod_supernet, "pod_supernet")
    fabric = _network(fabric_cidr, "fabric_cidr")
    services_net = _network(service_cidr, "service_cidr")
    if supernet.prefixlen > 16 or supernet.version != 4:
        raise PlanError(f"pod_supernet={pod_supernet}: use an IPv4 /16 or larger")
    if fabric.num_addresses < nodes + 2:
        raise PlanError(f"fabric_cidr={fabric_cidr} is too small for {nodes} nodes")
    if services_net.num_addresses < pods_per_node + 12:
        raise PlanError(f"service_cidr={service_cidr} is too small for {pods_per_node} services")
    for a, b in ((supernet, fabric), (supernet, services_net), (fabric, services_net)):
        if a.overlaps(b):
            raise PlanError(f"{a} and {b} overlap; pick disjoint ranges")

    prefix = f"{PREFIX}{tag}-"
    node_subnets = list(supernet.subnets(new_prefix=24))
    node_plans: list[NodePlan] = []
    pod_plans: list[PodPlan] = []
    for i in range(nodes):
        subnet = node_subnets[i]
        node_netns = f"{prefix}n{i}"
        node = NodePlan(
            name=f"node-{i}",
            index=i,
            netns=node_netns,
            pod_cidr=str(subnet),
            gateway=str(subnet.network_address + 1),
            fabric_ip=str(fabric.network_address + i + 1),
            fabric_prefixlen=fabric.prefixlen,
            fabric_ifname=f"n{i}",
            cgroup=f"{CGROUP_ROOT}/{node_netns}",
        )
        node_plans.append(node)
        for j in range(pods_per_node):
            name = f"pod-{i}-{j}"
            pod_plans.append(
                PodPlan(
                    name=name,
                    namespace=NAMESPACE,
                    service_account=f"app-{j}",
                    app=f"app-{j}",
                    node=node.name,
                    node_index=i,
                    index=j,
                    uid=f"{cluster_id}//Pod/{NAMESPACE}/{name}",
                    ip=str(subnet.network_address + 10 + j),
                    prefixlen=24,
                    gateway=node.gateway,
                    netns=f"{prefix}n{i}p{j}",
                    node_ifname=f"p{j}",
                    cgroup=f"{node.cgroup}/{name}",
                )
            )
    ports = {SERVICE_HTTP_PORT: HTTP_PORT, ECHO_PORT: ECHO_PORT}
    services = [
        ServicePlan(
            name=f"app-{j}",
            namespace=NAMESPACE,
            vip=str(services_net.network_address + 10 + j),
            ports=dict(ports),
            endpoints=tuple(p.name for p in pod_plans if p.index == j),
        )
        for j in range(pods_per_node)
    ]
    services.append(
        ServicePlan(
            name="echo",
            namespace=NAMESPACE,
            vip=str(services_net.network_address + 2),
            ports=dict(ports),
            endpoints=tuple(p.name for p in pod_plans),
        )
    )
    return TestbedPlan(
        tag=tag,
        nodes=tuple(node_plans),
        pods=tuple(pod_plans),
        services=tuple(services),
        fabric_netns=f"{prefix}fab",
        cluster_id=cluster_id,
    )


def _network(text: str, what: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    try:
        return ipaddress.ip_network(text)
    except ValueError as e:
        raise PlanError(f"{what}={text!r}: {e}") from None


def local_config(plan: TestbedPlan) -> dict[str, Any]:
    """The mesh in ztunnel's local-config format (``LOCAL_XDS_PATH``), for every node's daemon."""
    services_of: dict[str, dict[str, dict[int, int]]] = {p.name: {} for p in plan.pods}
    for svc in plan.services:
        for pod_name in svc.endpoints:
            services_of[pod_name][svc.key] = dict(svc.ports)
    workloads = [
        {
            "uid": pod.uid,
            "name": pod.name,
            "namespace": pod.namespace,
            "serviceAccount": pod.service_account,
            "workloadIps": [pod.ip],
            "protocol": "HBONE",
            "node": pod.node,
            "network": "",
            "canonicalName": pod.app,
            "canonicalRevision": "latest",
            "workloadName": pod.app,
            "workloadType": "deployment",
            "clusterId": plan.cluster_id,
            "services": services_of[pod.name],
        }
        for pod in plan.pods
    ]
    services: list[dict[str, Any]] = [
        {
            "name": svc.name,
            "namespace": svc.namespace,
            "hostname": svc.hostname,
            "vips": [f"/{svc.vip}"],
            "ports": dict(svc.ports),
            "subjectAltNames": sorted({plan.pod(p).identity for p in svc.endpoints}),
        }
        for svc in plan.services
    ]
    return {"workloads": workloads, "services": services}


def render_local_config(plan: TestbedPlan) -> str:
    header = (
        f"# ztunnel local config for testbed {plan.tag!r} ({len(plan.nodes)} nodes, "
        f"{len(plan.pods)} pods), written by tools.testbed.\n"
        "# Use it on every node: LOCAL_XDS_PATH=<this file> NODE_NAME=<node-N> ...\n"
    )
    return header + yaml.safe_dump(local_config(plan), sort_keys=False)
