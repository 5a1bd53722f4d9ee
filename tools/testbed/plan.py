"""The testbed's address plan and its ztunnel local-config, as pure data (no I/O).

N nodes with M pods each. Every name carries the prefix ``zttb-<tag>-`` so the testbed only
ever touches what it made:

- node ``i``: netns ``zttb-<tag>-n<i>``, a bridge ``br0`` at ``10.244.<i>.1/24`` (the pods'
  gateway), and ``eth0`` at ``192.168.244.<i+1>/24`` on the fabric;
- pod ``j`` of node ``i``: netns ``zttb-<tag>-n<i>p<j>``, ``eth0`` at ``10.244.<i>.<10+j>/24``,
  its peer ``p<j>`` on the node's bridge; cgroup ``ztunnel-py-testbed/<node netns>/<pod>``;
- more than 240 pods per node (up to 1,000, for memory curves) do not fit a /24: then every
  node's pod subnet is the smallest wider block that holds them (/23 up to 496 pods, /22 up to
  1,000; node ``i`` takes the ``i``-th such block of ``10.244.0.0/16``), pod ``j`` is the
  subnet's address ``10+j``, and the service range widens the same way from ``10.96.0.0``;
- the fabric: netns ``zttb-<tag>-fab`` with a bridge that links the nodes' ``eth0``s; each node
  routes the other nodes' pod subnets via their fabric addresses;
- services: ``app-<j>`` (VIP ``10.96.0.<10+j>``) groups pod ``j`` of every node, so each has
  endpoints on all nodes; ``echo`` (VIP ``10.96.0.2``) has every pod.

IP families (``ip_family``): ``ipv4`` (the plan above, the default), ``ipv6`` (IPv6 only) and
``dual`` (both, on the same bridges and links). The IPv6 plan mirrors the IPv4 one in ULA space:

- node ``i``: bridge ``br0`` at ``fd00:10:244:<i>::1/64``, fabric ``eth0`` at
  ``fd00:192:168:244::<i+1>/64``; each node routes the other nodes' pod /64s via their fabric
  addresses (``<i>`` and the host parts below are hexadecimal: pod 0 is ``::a``);
- pod ``j`` of node ``i``: ``fd00:10:244:<i>::<10+j>/64``, default route via the bridge;
- services: the IPv6 VIP of IPv4 VIP ``10.96.0.<n>`` is ``fd00:10:96::<n>`` (``echo`` at
  ``fd00:10:96::2``, ``app-<j>`` at ``fd00:10:96::<10+j>``), see ``ipv6_vip``.

A pod's ``ip`` is its primary address: IPv4 on ``ipv4``, IPv6 on ``ipv6`` *and* ``dual``, so the
suites' traffic on a dual-stack testbed exercises the new family while every workload and
service also carries its IPv4 address (``ips``, ``vips``). Services carry ``ip_families`` as
istiod sends them: ``IPv4``, ``IPv6`` or ``Dual``. Duplicate address detection is off in every
namespace, so IPv6 addresses are usable as soon as they are added.
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
MAX_PODS_PER_NODE = 1000  # pod host parts 10..1009 of a /22 (a /24 up to 240 pods)
_FIRST_POD_HOST = 10  # host parts below are the gateway's and reserved
_FREE_TOP_HOSTS = 6  # left unused at the top of a node's subnet (and the broadcast among them)
_TAG = re.compile(r"^[a-z0-9]{1,8}$")
IP_FAMILIES = ("ipv4", "ipv6", "dual")
POD_SUPERNET6 = "fd00:10:244::/48"
FABRIC_CIDR6 = "fd00:192:168:244::/64"
SERVICE_CIDR6 = "fd00:10:96::/112"
_SERVICE_CIDR4 = ipaddress.ip_network("10.96.0.0/16")  # what ipv6_vip maps
# ztunnel's ip_families values (the local config's ``ipFamilies``), per testbed family.
SERVICE_IP_FAMILIES = {"ipv4": "IPv4", "ipv6": "IPv6", "dual": "Dual"}


def ipv6_vip(vip4: str) -> str:
    """The IPv6 twin of an IPv4 service VIP in ``10.96.0.0/16``: same offset, IPv6 range."""
    addr = ipaddress.ip_address(vip4)
    if addr not in _SERVICE_CIDR4:
        raise PlanError(f"VIP {vip4}: the IPv6 twin is defined for {_SERVICE_CIDR4} only")
    offset = int(addr) - int(_SERVICE_CIDR4.network_address)
    return str(ipaddress.ip_network(SERVICE_CIDR6).network_address + offset)


def family_addresses(ip_family: str, ip4: str, ip6: str) -> tuple[str, ...]:
    """The addresses a ``ip_family`` testbed gives something whose IPv4/IPv6 addresses are
    ``ip4``/``ip6``, primary first (see the module docstring)."""
    if ip_family == "ipv4":
        return (ip4,)
    if ip_family == "ipv6":
        return (ip6,)
    return (ip6, ip4)


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
    # IPv6 (ipv6 and dual testbeds; "" otherwise): the /64 of its pods, its bridge and fabric
    pod_cidr6: str = ""
    gateway6: str = ""
    fabric_ip6: str = ""

    @property
    def prefixlen(self) -> int:
        """The IPv4 pod subnet's prefix length (24 unless the node holds more than 240 pods)."""
        return ipaddress.ip_network(self.pod_cidr).prefixlen


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
    ip: str  # the primary address (IPv6 on ipv6 and dual testbeds)
    prefixlen: int
    gateway: str
    netns: str
    node_ifname: str  # the pod's veth peer, on the node's bridge
    cgroup: str
    ips: tuple[str, ...] = ()  # every address, primary first ("" plan: just ``ip``)

    @property
    def addresses(self) -> tuple[str, ...]:
        return self.ips or (self.ip,)

    def address(self, version: int) -> str:
        """The pod's address of IP version 4 or 6."""
        for ip in self.addresses:
            if ipaddress.ip_address(ip).version == version:
                return ip
        raise KeyError(f"pod {self.name} has no IPv{version} address ({', '.join(self.addresses)})")

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
    vip: str  # the primary VIP
    ports: dict[int, int]  # service port -> target port
    endpoints: tuple[str, ...]  # pod names
    vips: tuple[str, ...] = ()  # every VIP, primary first ("": just ``vip``)
    ip_families: str = "IPv4"  # IPv4 | IPv6 | Dual, as istiod sends it

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
    ip_family: str = "ipv4"  # ipv4 | ipv6 | dual

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
            pods=tuple(PodPlan(**{**p, "ips": tuple(p.get("ips", ()))}) for p in data["pods"]),
            services=tuple(
                ServicePlan(
                    name=s["name"],
                    namespace=s["namespace"],
                    vip=s["vip"],
                    ports={int(k): int(v) for k, v in s["ports"].items()},
                    endpoints=tuple(s["endpoints"]),
                    vips=tuple(s.get("vips", ())),
                    ip_families=s.get("ip_families", "IPv4"),
                )
                for s in data["services"]
            ),
            fabric_netns=data["fabric_netns"],
            cluster_id=data.get("cluster_id", "Kubernetes"),
            http_port=data.get("http_port", HTTP_PORT),
            echo_port=data.get("echo_port", ECHO_PORT),
            extra=data.get("extra", {}),
            ip_family=data.get("ip_family", "ipv4"),
        )

    @property
    def versions(self) -> tuple[int, ...]:
        """The IP versions the testbed carries, primary first."""
        return {"ipv4": (4,), "ipv6": (6,), "dual": (6, 4)}[self.ip_family]


def make_plan(
    tag: str = "tb",
    nodes: int = 2,
    pods_per_node: int = 2,
    *,
    pod_supernet: str = "10.244.0.0/16",
    fabric_cidr: str = "192.168.244.0/24",
    service_cidr: str = "",
    cluster_id: str = "Kubernetes",
    ip_family: str = "ipv4",
) -> TestbedPlan:
    if ip_family not in IP_FAMILIES:
        raise PlanError(f"ip_family={ip_family!r}: use one of {', '.join(IP_FAMILIES)}")
    if not _TAG.match(tag):
        raise PlanError(f"tag {tag!r}: use 1-8 lower-case letters or digits")
    if not 1 <= nodes <= MAX_NODES:
        raise PlanError(f"nodes={nodes}: use 1..{MAX_NODES}")
    if not 1 <= pods_per_node <= MAX_PODS_PER_NODE:
        raise PlanError(f"pods_per_node={pods_per_node}: use 1..{MAX_PODS_PER_NODE}")
    supernet = _network(pod_supernet, "pod_supernet")
    fabric = _network(fabric_cidr, "fabric_cidr")
    # A /24 per node (and for the services) while the pods fit, else the smallest wider block.
    block_prefixlen = _block_prefixlen(pods_per_node)
    services_net = _network(service_cidr or f"10.96.0.0/{block_prefixlen}", "service_cidr")
    if supernet.prefixlen > 16 or supernet.version != 4:
        raise PlanError(f"pod_supernet={pod_supernet}: use an IPv4 /16 or larger")
    node_subnets = list(supernet.subnets(new_prefix=block_prefixlen))
    if len(node_subnets) < nodes:
        raise PlanError(
            f"pod_supernet={pod_supernet} holds {len(node_subnets)} node subnets of "
            f"/{block_prefixlen} ({pods_per_node} pods each), not {nodes}"
        )
    if fabric.num_addresses < nodes + 2:
        raise PlanError(f"fabric_cidr={fabric_cidr} is too small for {nodes} nodes")
    if services_net.num_addresses < pods_per_node + 12:
        raise PlanError(f"service_cidr={service_cidr} is too small for {pods_per_node} services")
    for a, b in ((supernet, fabric), (supernet, services_net), (fabric, services_net)):
        if a.overlaps(b):
            raise PlanError(f"{a} and {b} overlap; pick disjoint ranges")

    prefix = f"{PREFIX}{tag}-"
    v6 = ip_family != "ipv4"
    supernet6 = ipaddress.ip_network(POD_SUPERNET6)
    fabric6 = ipaddress.ip_network(FABRIC_CIDR6)
    node_plans: list[NodePlan] = []
    pod_plans: list[PodPlan] = []
    for i in range(nodes):
        subnet = node_subnets[i]
        subnet6 = ipaddress.ip_network(f"{supernet6.network_address + (i << 64)}/64")
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
            pod_cidr6=str(subnet6) if v6 else "",
            gateway6=str(subnet6.network_address + 1) if v6 else "",
            fabric_ip6=str(fabric6.network_address + i + 1) if v6 else "",
        )
        node_plans.append(node)
        for j in range(pods_per_node):
            name = f"pod-{i}-{j}"
            ips = family_addresses(
                ip_family,
                str(subnet.network_address + _FIRST_POD_HOST + j),
                str(subnet6.network_address + _FIRST_POD_HOST + j),
            )
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
                    ip=ips[0],
                    prefixlen=64 if v6 else block_prefixlen,
                    gateway=node.gateway6 if v6 else node.gateway,
                    netns=f"{prefix}n{i}p{j}",
                    node_ifname=f"p{j}",
                    cgroup=f"{node.cgroup}/{name}",
                    ips=ips,
                )
            )
    ports = {SERVICE_HTTP_PORT: HTTP_PORT, ECHO_PORT: ECHO_PORT}

    def service(name: str, host: int, endpoints: tuple[str, ...]) -> ServicePlan:
        vip4 = services_net.network_address + host
        vip6 = ipaddress.ip_network(SERVICE_CIDR6).network_address + host
        vips = family_addresses(ip_family, str(vip4), str(vip6))
        return ServicePlan(
            name=name,
            namespace=NAMESPACE,
            vip=vips[0],
            ports=dict(ports),
            endpoints=endpoints,
            vips=vips,
            ip_families=SERVICE_IP_FAMILIES[ip_family],
        )

    services = [
        service(f"app-{j}", 10 + j, tuple(p.name for p in pod_plans if p.index == j))
        for j in range(pods_per_node)
    ]
    services.append(service("echo", 2, tuple(p.name for p in pod_plans)))
    return TestbedPlan(
        tag=tag,
        nodes=tuple(node_plans),
        pods=tuple(pod_plans),
        services=tuple(services),
        fabric_netns=f"{prefix}fab",
        cluster_id=cluster_id,
        ip_family=ip_family,
    )


def _block_prefixlen(pods_per_node: int) -> int:
    """The IPv4 prefix of a node's pod subnet: the smallest block, a /24 or wider, that holds
    the pods from host part 10 up with the top 6 addresses left free (240 pods in a /24)."""
    prefixlen = 24
    while 2 ** (32 - prefixlen) - _FIRST_POD_HOST - _FREE_TOP_HOSTS < pods_per_node:
        prefixlen -= 1
    return prefixlen


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
            "workloadIps": list(pod.addresses),
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
            "vips": [f"/{vip}" for vip in svc.vips or (svc.vip,)],
            "ports": dict(svc.ports),
            "subjectAltNames": sorted({plan.pod(p).identity for p in svc.endpoints}),
            "ipFamilies": svc.ip_families,
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
