"""The mesh as ztunnel-py sees it: workloads, services, endpoints. Pure, immutable data.

These mirror ztunnel's internal types (``src/state/{workload,service}.rs``) rather than the
protobuf messages: protobuf stops at ``xds/``/``state.convert``, the rest of the code sees these.
Cross-references are by key (workload uid, ``namespace/hostname``), never by object.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TypeVar

# The model's address vocabulary, re-exported: most of the package imports it from here.
from ztunnel_py.ip import IPAddress as IPAddress
from ztunnel_py.ip import IPNetwork, parse_ip

#: An IP and a port, as the proxy and telemetry pass them around.
SocketAddr = tuple[IPAddress, int]

DEFAULT_TRUST_DOMAIN = "cluster.local"
DEFAULT_SERVICE_ACCOUNT = "default"
DEFAULT_CLUSTER_ID = "Kubernetes"
DEFAULT_WORKLOAD_TYPE = "deployment"

_K = TypeVar("_K")
_V = TypeVar("_V")


def frozen_map(items: Mapping[_K, _V] | None = None) -> Mapping[_K, _V]:
    return MappingProxyType(dict(items or {}))


class InboundProtocol(enum.Enum):
    """How a workload accepts mesh traffic (ztunnel ``InboundProtocol``)."""

    TCP = "TCP"
    HBONE = "HBONE"


class NetworkMode(enum.Enum):
    STANDARD = "Standard"
    HOST_NETWORK = "HostNetwork"


class HealthStatus(enum.Enum):
    HEALTHY = "Healthy"
    UNHEALTHY = "Unhealthy"


class AppTunnelProtocol(enum.Enum):
    NONE = "NONE"
    PROXY = "PROXY"


class LoadBalancerMode(enum.Enum):
    STANDARD = "Standard"
    STRICT = "Strict"
    FAILOVER = "Failover"
    PASSTHROUGH = "Passthrough"


class LoadBalancerHealthPolicy(enum.Enum):
    ONLY_HEALTHY = "OnlyHealthy"
    ALLOW_ALL = "AllowAll"


class LoadBalancerScope(enum.Enum):
    REGION = "Region"
    ZONE = "Zone"
    SUBZONE = "Subzone"
    NODE = "Node"
    CLUSTER = "Cluster"
    NETWORK = "Network"


class IpFamily(enum.Enum):
    DUAL = "Dual"
    IPV4 = "IPv4"
    IPV6 = "IPv6"

    def accepts_ip(self, ip: IPAddress) -> bool:
        """ztunnel's ``IpFamily::accepts_ip``: a single-stack service takes its family only."""
        if self is IpFamily.IPV4:
            return ip.version == 4
        if self is IpFamily.IPV6:
            return ip.version == 6
        return True


class Visibility(enum.Enum):
    PUBLIC = "Public"
    NAMESPACE = "Namespace"


@dataclass(frozen=True, slots=True, order=True)
class NetworkAddress:
    """An IP on a network; written ``network/ip`` (an empty network gives ``/10.0.0.1``)."""

    network: str
    address: IPAddress

    def __str__(self) -> str:
        return f"{self.network}/{self.address}"

    @classmethod
    def parse(cls, text: str) -> NetworkAddress:
        """``network/ip``; raises ``ValueError`` with what was wrong."""
        network, sep, ip = text.rpartition("/")
        if not sep:
            raise ValueError(f"{text!r} is not network/ip (write /{text} for the default network)")
        return cls(network, parse_ip(ip))


@dataclass(frozen=True, slots=True, order=True)
class NamespacedHostname:
    namespace: str
    hostname: str

    def __str__(self) -> str:
        return f"{self.namespace}/{self.hostname}"

    @classmethod
    def parse(cls, text: str) -> NamespacedHostname:
        namespace, sep, hostname = text.partition("/")
        if not sep or not namespace or not hostname:
            raise ValueError(f"{text!r} is not namespace/hostname")
        return cls(namespace, hostname)


@dataclass(frozen=True, slots=True, kw_only=True)
class GatewayAddress:
    """A waypoint or network gateway: an address or a service hostname, plus its HBONE port."""

    destination: NetworkAddress | NamespacedHostname
    hbone_mtls_port: int = 15008


@dataclass(frozen=True, slots=True)
class WeightedWaypoint:
    """One waypoint of a service's weighted set (a canary split): chosen per connection in
    proportion to ``weight``."""

    destination: GatewayAddress
    weight: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Locality:
    region: str = ""
    zone: str = ""
    subzone: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class ApplicationTunnel:
    protocol: AppTunnelProtocol = AppTunnelProtocol.NONE
    port: int | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class LoadBalancer:
    routing_preferences: tuple[LoadBalancerScope, ...] = ()
    mode: LoadBalancerMode = LoadBalancerMode.STANDARD
    health_policy: LoadBalancerHealthPolicy = LoadBalancerHealthPolicy.ONLY_HEALTHY


@dataclass(frozen=True, slots=True, kw_only=True)
class Workload:
    """One pod (or VM, or ServiceEntry endpoint), keyed by ``uid``."""

    uid: str
    name: str
    namespace: str
    workload_ips: tuple[IPAddress, ...] = ()
    hostname: str = ""
    network: str = ""
    protocol: InboundProtocol = InboundProtocol.TCP
    trust_domain: str = DEFAULT_TRUST_DOMAIN
    service_account: str = DEFAULT_SERVICE_ACCOUNT
    waypoint: GatewayAddress | None = None
    network_gateway: GatewayAddress | None = None
    node: str = ""
    canonical_name: str = ""
    canonical_revision: str = ""
    workload_type: str = DEFAULT_WORKLOAD_TYPE
    workload_name: str = ""
    native_tunnel: bool = False
    application_tunnel: ApplicationTunnel | None = None
    # "namespace/hostname" -> {service port: target port}; endpoints are derived from this.
    services: Mapping[str, Mapping[int, int]] = field(default_factory=frozen_map)
    authorization_policies: tuple[str, ...] = ()
    status: HealthStatus = HealthStatus.HEALTHY
    cluster_id: str = DEFAULT_CLUSTER_ID
    locality: Locality = field(default_factory=Locality)
    network_mode: NetworkMode = NetworkMode.STANDARD
    capacity: int = 1

    @property
    def identity(self) -> str:
        """The SPIFFE id this workload's certificate carries."""
        return f"spiffe://{self.trust_domain}/ns/{self.namespace}/sa/{self.service_account}"

    @property
    def network_addresses(self) -> tuple[NetworkAddress, ...]:
        return tuple(NetworkAddress(self.network, ip) for ip in self.workload_ips)


@dataclass(frozen=True, slots=True, kw_only=True)
class Endpoint:
    """A workload behind a service; ``ports`` maps service port to the workload's target port."""

    workload_uid: str
    service: str  # "namespace/hostname"
    ports: Mapping[int, int] = field(default_factory=frozen_map)


@dataclass(frozen=True, slots=True, order=True)
class CidrVip:
    """A service VIP that is a whole prefix (``NetworkAddress.length`` shorter than a host)."""

    network: str
    prefix: IPNetwork

    def __str__(self) -> str:
        return f"{self.network}/{self.prefix}"


@dataclass(frozen=True, slots=True, kw_only=True)
class Service:
    """A Kubernetes Service or ServiceEntry, keyed by ``namespace/hostname``."""

    name: str
    namespace: str
    hostname: str
    vips: tuple[NetworkAddress, ...] = ()
    ports: Mapping[int, int] = field(default_factory=frozen_map)  # service port -> target port
    subject_alt_names: tuple[str, ...] = ()
    waypoint: GatewayAddress | None = None
    #: When not empty, routing samples one of these per connection instead of ``waypoint``
    #: (which istiod keeps as the primary, and which is used when no weight is positive).
    weighted_waypoints: tuple[WeightedWaypoint, ...] = ()
    load_balancer: LoadBalancer | None = None
    ip_families: IpFamily | None = None
    canonical: bool = False
    visibility: Visibility = Visibility.PUBLIC
    #: VIPs that are whole prefixes: an address no host VIP matches falls back to them.
    cidr_vips: tuple[CidrVip, ...] = ()

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.hostname}"
