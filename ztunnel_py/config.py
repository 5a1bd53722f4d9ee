"""Every environment variable ztunnel-py honours, parsed once into a frozen ``Config``.

Names, defaults and meanings are ztunnel's (``src/config.rs``), so an operator can swap one
daemon for the other without rereading the docs. The few additions of ours are marked
"ztunnel-py" below. This is the only module that reads ``os.environ``; everything else is
given a ``Config``.
"""

from __future__ import annotations

import dataclasses
import enum
import ipaddress
import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from ztunnel_py.errors import ConfigError
from ztunnel_py.log_levels import parse_level_spec

# --- ports (ztunnel ARCHITECTURE.md) ---------------------------------------------------------
PORT_ADMIN = 15000
PORT_OUTBOUND = 15001
PORT_INBOUND_PLAINTEXT = 15006
PORT_HBONE = 15008
PORT_STATS = 15020
PORT_READINESS = 15021
PORT_DNS = 15053
PORT_SOCKS5 = 15080

DEFAULT_PACKET_MARK = 1337  # 0x539, istio-cni's InpodMark
PACKET_MARK_MASK = 0xFFF  # istio-cni's InpodMask: the mark bits its rules compare
# Added to PACKET_MARK on the proxy's original-source sockets (ENABLE_ORIG_SRC): outside the
# mask, so they still count as the proxy's; eBPF mode routes replies carrying it back locally.
ORIG_SRC_MARK = 0x1000
# TRANSPARENT_NETWORK_POLICIES (beyond ztunnel): HBONE sent to an application's own port comes
# from a source port in this range, which is how the receiving pod's redirection tells it from
# plaintext (outside Linux's default ephemeral range, 32768-60999).
HBONE_SOURCE_PORTS = range(15100, 15200)
# istio-cni SNATs the kubelet's probes to these: they reach the pod, never the proxy.
PROBE_IP4 = ipaddress.IPv4Address("169.254.7.127")
PROBE_IP6 = ipaddress.IPv6Address("fd16:9254:7127:1337:ffff:ffff:ffff:ffff")
DEFAULT_ROOT_CERT = "./var/run/secrets/istio/root-cert.pem"
DEFAULT_TOKEN = "./var/run/secrets/tokens/istio-token"  # noqa: S105 (a path, not a secret)
DEFAULT_INPOD_UDS = "/var/run/ztunnel/ztunnel.sock"
DEFAULT_MESH_CONFIG = "./etc/istio/config/mesh"
DEFAULT_LOCAL_CA_DIR = "/var/lib/ztunnel-py/ca"
DEFAULT_BPF_PIN_PATH = "/sys/fs/bpf/ztunnel-py"
DEFAULT_RESOLV_CONF = "/etc/resolv.conf"
CERT_SYSTEM = "SYSTEM"

_E = TypeVar("_E", bound=enum.Enum)


class ProxyMode(enum.Enum):
    SHARED = "shared"
    DEDICATED = "dedicated"


class RedirectMode(enum.Enum):
    """How connections reach the in-pod listeners (ztunnel-py)."""

    EBPF = "ebpf"
    IPTABLES = "iptables"


class LogFormat(enum.Enum):
    TEXT = "text"
    JSON = "json"


class RootCertKind(enum.Enum):
    FILE = "file"
    SYSTEM = "system"
    INLINE = "inline"


@dataclass(frozen=True, slots=True)
class RootCert:
    """Where the istiod (or CA) TLS roots come from: a file, the OS store, or inline PEM."""

    kind: RootCertKind
    value: str = ""

    def describe(self) -> str:
        if self.kind is RootCertKind.INLINE:
            return "inline PEM"
        if self.kind is RootCertKind.SYSTEM:
            return CERT_SYSTEM
        return self.value


@dataclass(frozen=True, slots=True)
class DnsProxyAddress:
    """ztunnel's ``DNS_PROXY_ADDR``: ``localhost:<port>`` (127.0.0.1, and ::1 with IPv6) or
    one ``ip:port`` / ``[ipv6]:port``."""

    host: str  # "localhost" or an IP address
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def bind_addresses(self, *, ipv6: bool) -> tuple[tuple[str, int], ...]:
        if self.host == "localhost":
            both = (("127.0.0.1", self.port), ("::1", self.port))
            return both if ipv6 else both[:1]
        return ((self.host, self.port),)


@dataclass(frozen=True, slots=True)
class WorkloadInfo:
    """``PROXY_WORKLOAD_INFO=namespace/name/serviceaccount`` for dedicated mode."""

    namespace: str
    name: str
    service_account: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Config:
    # control plane
    xds_address: str | None
    ca_address: str | None
    xds_root_cert: RootCert
    ca_root_cert: RootCert
    alt_xds_hostname: str | None = None
    alt_ca_hostname: str | None = None
    auth_token: str = DEFAULT_TOKEN
    cluster_id: str = "Kubernetes"
    cluster_domain: str = "cluster.local"
    trust_domain: str = "cluster.local"
    network: str = ""
    node_name: str | None = None
    pod_name: str = ""
    pod_namespace: str = ""
    instance_ip: str = "1.1.1.1"
    service_account: str = ""
    xds_on_demand: bool = False
    local_xds_path: Path | None = None
    local_xds: str | None = None
    fake_ca: bool = False
    secret_ttl_s: float = 86400.0
    xds_headers: Mapping[str, str] = field(default_factory=dict)
    ca_headers: Mapping[str, str] = field(default_factory=dict)
    proxy_metadata: Mapping[str, Any] = field(default_factory=dict)
    # proxy
    proxy_mode: ProxyMode = ProxyMode.SHARED
    proxy_workload_info: WorkloadInfo | None = None
    inpod_enabled: bool = True
    inpod_uds: Path = Path(DEFAULT_INPOD_UDS)
    inpod_port_reuse: bool = True
    packet_mark: int = DEFAULT_PACKET_MARK
    enable_orig_src: bool | None = None
    # PROXY app tunnels are dialled loopback to loopback inside the pod (ztunnel's default)
    localhost_app_tunnel: bool = True
    #: Beyond ztunnel (istio/ztunnel#1665): HBONE to a pod keeps the app's port on the wire.
    transparent_network_policies: bool = False
    pool_max_streams_per_connection: int = 100
    pool_unused_release_timeout_s: float = 300.0
    http2_stream_window_size: int = 4 * 1024 * 1024
    http2_connection_window_size: int = 16 * 1024 * 1024
    http2_frame_size: int = 1024 * 1024
    keepalive_enabled: bool = True
    keepalive_time_s: float = 180.0
    keepalive_interval_s: float = 180.0
    keepalive_retries: int = 9
    user_timeout_enabled: bool = False
    connection_termination_deadline_s: float = 5.0
    ipv6_enabled: bool = True
    tls12_enabled: bool = False
    enable_response_baggage: bool = True
    authz_policy_info_logging: bool = False
    # ztunnel's DNS proxy: on unless ISTIO_META_DNS_CAPTURE is set to something but "true"
    dns_proxy: bool = True
    dns_proxy_addr: DnsProxyAddress = field(
        default_factory=lambda: DnsProxyAddress("localhost", PORT_DNS)
    )
    #: Beyond ztunnel (istio/istio#43376): log only connections that failed or were denied.
    access_log_errors_only: bool = False
    # admin surface
    admin_port: int = PORT_ADMIN
    stats_port: int = PORT_STATS
    readiness_port: int = PORT_READINESS
    log_level: str = "info"
    log_format: LogFormat = LogFormat.TEXT
    # ztunnel-py additions
    redirect_mode: RedirectMode | None = None  # None: eBPF where the kernel allows, else iptables
    local_ca_dir: Path = Path(DEFAULT_LOCAL_CA_DIR)
    bpf_pin_path: Path = Path(DEFAULT_BPF_PIN_PATH)
    bpf_cgroup_path: Path | None = None  # None: the kubelet's kubepods cgroup, found at start
    bpf_object_dir: Path | None = None  # None: bpf/out next to the package (a source checkout)
    dns_resolv_conf: Path = Path(DEFAULT_RESOLV_CONF)  # the DNS proxy's upstream resolvers
    crl_path: Path | None = None  # CRL_PATH: peers' chains checked against its CRLs
    # ZTUNNEL_PY_KERNEL_SPLICE: None (auto) splices same-node connections in the kernel when it
    # can, True insists (start fails without it), False copies them in Python.
    kernel_splice: bool | None = None
    #: Data-plane worker processes (ztunnel's ``num_worker_threads``, see ``worker_threads``);
    #: 1 serves in the daemon's own process, as before workers existed.
    worker_threads: int = 1

    @property
    def uses_local_xds(self) -> bool:
        return self.local_xds_path is not None or self.local_xds is not None

    @property
    def uses_local_ca(self) -> bool:
        """The embedded CA issues certificates when no istiod CA is configured."""
        return self.ca_address is None and not self.fake_ca

    def to_dump(self) -> dict[str, Any]:
        """The ``config`` section of ``/config_dump`` (camelCase, secrets left out)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in {"local_xds", "auth_token"}:
                value = "<redacted>" if value else None
            out[_camel(f.name)] = _jsonable(value)
        return out


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(p.capitalize() for p in rest)


def _jsonable(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, RootCert):
        return value.describe()
    if isinstance(value, DnsProxyAddress):
        return str(value)
    if isinstance(value, WorkloadInfo):
        return f"{value.namespace}/{value.name}/{value.service_account}"
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return value


# --- value parsers -----------------------------------------------------------------------------

_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h|d)")
_DURATION_UNITS = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
    "d": 86400.0,
}


def parse_bool(name: str, raw: str) -> bool:
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ConfigError(name, raw, "a boolean (true or false)")


def parse_duration(name: str, raw: str) -> float:
    """Go/humantime durations as ztunnel accepts them: ``5s``, ``1m30s``, ``24h``, ``100ms``."""
    text = raw.strip()
    if not text:
        raise ConfigError(name, raw, "a duration such as 5s, 10m or 24h")
    pos = 0
    total = 0.0
    for m in _DURATION_PART.finditer(text):
        if m.start() != pos:
            break
        total += float(m.group(1)) * _DURATION_UNITS[m.group(2)]
        pos = m.end()
    if pos != len(text):
        raise ConfigError(name, raw, "a duration such as 5s, 10m or 24h")
    return total


def parse_int(name: str, raw: str, *, minimum: int = 0, maximum: int | None = None) -> int:
    try:
        value = int(raw.strip(), 0)
    except ValueError:
        raise ConfigError(name, raw, "an integer") from None
    if value < minimum or (maximum is not None and value > maximum):
        upper = f" and at most {maximum}" if maximum is not None else ""
        raise ConfigError(name, raw, f"an integer at least {minimum}{upper}")
    return value


def parse_enum(name: str, raw: str, kind: type[_E]) -> _E:
    for member in kind:
        if raw.strip().lower() == str(member.value).lower():
            return member
    allowed = " or ".join(str(m.value) for m in kind)
    raise ConfigError(name, raw, allowed)


def parse_address(name: str, raw: str) -> str | None:
    """ztunnel's validate_uri: empty disables, a missing scheme becomes https://."""
    text = raw.strip()
    if not text:
        return None
    if "://" not in text:
        text = "https://" + text
    scheme, _, rest = text.partition("://")
    if scheme not in {"https", "http"} or not rest or " " in rest:
        raise ConfigError(name, raw, "an address such as istiod.istio-system.svc:15012")
    host, sep, port = rest.rpartition(":")
    if sep and (not port.isdigit() or not host):
        raise ConfigError(name, raw, "an address such as istiod.istio-system.svc:15012")
    return text


def parse_root_cert(raw: str) -> RootCert:
    if raw == CERT_SYSTEM:
        return RootCert(RootCertKind.SYSTEM)
    if "-----BEGIN" in raw:
        return RootCert(RootCertKind.INLINE, raw)
    return RootCert(RootCertKind.FILE, raw)


def parse_dns_proxy_addr(name: str, raw: str) -> DnsProxyAddress:
    """ztunnel's ``Address::new``: ``localhost:<port>`` or a socket address."""
    text = raw.strip()
    host, sep, port_text = text.rpartition(":")
    expected = "localhost:<port>, <ip>:<port> or [<ipv6>]:<port>"
    if not sep or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ConfigError(name, raw, expected)
    if host != "localhost":
        bracketed = host.startswith("[") and host.endswith("]")
        bare, _, zone = (host[1:-1] if bracketed else host).partition("%")
        if zone and not zone.isdigit():
            # A socket address (Rust's SocketAddrV6) takes a numeric zone only: [fe80::1%2]:53.
            raise ConfigError(name, raw, "a numeric IPv6 zone ([fe80::1%2]:<port>), not a name")
        try:
            ip = ipaddress.ip_address(f"{bare}%{zone}" if zone else bare)
        except ValueError:
            raise ConfigError(name, raw, expected) from None
        if (ip.version == 6) != bracketed:
            raise ConfigError(name, raw, expected)
        host = str(ip)
    return DnsProxyAddress(host, int(port_text))


def parse_workload_info(name: str, raw: str) -> WorkloadInfo:
    parts = raw.split("/")
    if len(parts) != 3 or not all(parts):
        raise ConfigError(name, raw, "namespace/name/serviceaccount")
    return WorkloadInfo(namespace=parts[0], name=parts[1], service_account=parts[2])


def _proxy_config(env: Mapping[str, str]) -> dict[str, Any]:
    """Mesh-config ``defaultConfig`` merged with ``PROXY_CONFIG`` (YAML ProxyConfig), as ztunnel."""
    merged: dict[str, Any] = {}
    mesh_path = Path(env.get("MESH_CONFIG_PATH", DEFAULT_MESH_CONFIG))
    sources: list[tuple[str, str]] = []
    if mesh_path.is_file():
        sources.append((str(mesh_path), mesh_path.read_text()))
    if env.get("PROXY_CONFIG"):
        sources.append(("PROXY_CONFIG", env["PROXY_CONFIG"]))
    for origin, text in sources:
        try:
            doc = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise ConfigError(origin, text[:80], f"YAML ({e})") from None
        if not isinstance(doc, dict):
            raise ConfigError(origin, text[:80], "a YAML mapping")
        if origin != "PROXY_CONFIG":
            doc = doc.get("defaultConfig") or {}
        meta = {**merged.get("proxyMetadata", {}), **(doc.get("proxyMetadata") or {})}
        merged.update(doc)
        merged["proxyMetadata"] = meta
    return merged


def _termination_deadline(env: Mapping[str, str]) -> float:
    if "CONNECTION_TERMINATION_DEADLINE" in env:
        return parse_duration(
            "CONNECTION_TERMINATION_DEADLINE", env["CONNECTION_TERMINATION_DEADLINE"]
        )
    if "TERMINATION_GRACE_PERIOD_SECONDS" in env:
        grace = parse_int(
            "TERMINATION_GRACE_PERIOD_SECONDS", env["TERMINATION_GRACE_PERIOD_SECONDS"]
        )
        # ztunnel leaves 5s of the grace period for its own exit, 1s when the period is short.
        return float(max(grace - 5, 0) if grace > 10 else max(grace - 1, 0))
    return 5.0


def admin_port_from_env(env: Mapping[str, str] | None = None) -> int:
    """The admin port alone, as ``from_env`` reads it: for commands that talk to a running
    daemon and need none of the rest of its configuration."""
    env = dict(os.environ if env is None else env)
    return _admin_port(env, _proxy_config(env))


def bpf_pin_path_from_env(env: Mapping[str, str] | None = None) -> Path:
    """``BPF_PIN_PATH`` alone, as ``from_env`` reads it."""
    return _bpf_pin_path(os.environ if env is None else env)


def _admin_port(env: Mapping[str, str], pc: Mapping[str, Any]) -> int:
    raw = env.get("ADMIN_PORT")
    if raw is None:
        return int(pc.get("proxyAdminPort") or PORT_ADMIN)
    return parse_int("ADMIN_PORT", raw, maximum=65535)


def _bpf_pin_path(env: Mapping[str, str]) -> Path:
    return Path(env.get("BPF_PIN_PATH") or DEFAULT_BPF_PIN_PATH)


def from_env(env: Mapping[str, str] | None = None) -> Config:
    """Parse ``env`` (default ``os.environ``); the first bad value raises ``ConfigError``."""
    env = dict(os.environ if env is None else env)
    pc = _proxy_config(env)

    def get(name: str, default: str | None = None) -> str | None:
        return env.get(name, default)

    def boolean(name: str, default: bool) -> bool:
        raw = get(name)
        return default if raw is None else parse_bool(name, raw)

    def integer(name: str, default: int, **bounds: int) -> int:
        raw = get(name)
        return default if raw is None else parse_int(name, raw, **bounds)

    def duration(name: str, default: float) -> float:
        raw = get(name)
        return default if raw is None else parse_duration(name, raw)

    local_xds_path = get("LOCAL_XDS_PATH")
    local_xds = get("LOCAL_XDS")
    if local_xds_path and local_xds:
        raise ConfigError("LOCAL_XDS", "<inline>", "unset: LOCAL_XDS_PATH is set too, pick one")
    uses_local = bool(local_xds_path or local_xds)

    default_istiod = (
        "https://istiod.istio-system.svc:15012"
        if "KUBERNETES_SERVICE_HOST" in env
        else "https://localhost:15012"
    )
    # With a local config file and no explicit XDS_ADDRESS, the local file is the only source.
    if "XDS_ADDRESS" in env:
        xds_address = parse_address("XDS_ADDRESS", env["XDS_ADDRESS"])
    elif pc.get("discoveryAddress"):
        xds_address = parse_address("PROXY_CONFIG.discoveryAddress", str(pc["discoveryAddress"]))
    else:
        xds_address = None if uses_local else default_istiod

    fake_ca = boolean("FAKE_CA", False)
    if fake_ca:
        ca_address = None
    elif "CA_ADDRESS" in env:
        ca_address = parse_address("CA_ADDRESS", env["CA_ADDRESS"])
    else:
        ca_address = None if uses_local else default_istiod

    cluster_id = env.get("ISTIO_META_CLUSTER_ID") or env.get("CLUSTER_ID") or "Kubernetes"

    # ProxyConfig metadata values are strings in Istio; YAML may have typed them (true, 1).
    proxy_metadata: dict[str, Any] = {
        str(k): (str(v).lower() if isinstance(v, bool) else str(v))
        for k, v in (pc.get("proxyMetadata") or {}).items()
    }
    for key, value in env.items():
        if key.startswith("ISTIO_META_"):
            proxy_metadata[key.removeprefix("ISTIO_META_")] = value
    for key, value in env.items():
        if key.startswith("ISTIO_METAJSON_"):
            try:
                proxy_metadata[key.removeprefix("ISTIO_METAJSON_")] = json.loads(value)
            except json.JSONDecodeError:
                raise ConfigError(key, value, "a JSON value") from None

    proxy_mode = parse_enum("PROXY_MODE", get("PROXY_MODE", "shared") or "", ProxyMode)
    workload_info = None
    if get("PROXY_WORKLOAD_INFO"):
        workload_info = parse_workload_info("PROXY_WORKLOAD_INFO", env["PROXY_WORKLOAD_INFO"])
    if proxy_mode is ProxyMode.DEDICATED and workload_info is None and not uses_local:
        raise ConfigError(
            "PROXY_WORKLOAD_INFO", "", "namespace/name/serviceaccount in dedicated mode"
        )

    orig_src_raw = get("ENABLE_ORIG_SRC")
    enable_orig_src = None if orig_src_raw is None else parse_bool("ENABLE_ORIG_SRC", orig_src_raw)

    # As ztunnel: absent means on, any value but "true" (any case) means off.
    dns_capture_raw = proxy_metadata.get("DNS_CAPTURE")
    dns_proxy = dns_capture_raw is None or str(dns_capture_raw).lower() == "true"
    dns_proxy_addr = DnsProxyAddress("localhost", PORT_DNS)
    if proxy_metadata.get("DNS_PROXY_ADDR") is not None:
        dns_proxy_addr = parse_dns_proxy_addr(
            "ISTIO_META_DNS_PROXY_ADDR", str(proxy_metadata["DNS_PROXY_ADDR"])
        )
    xds_on_demand = boolean("XDS_ON_DEMAND", False)
    if xds_on_demand and dns_proxy:
        raise ConfigError(
            "XDS_ON_DEMAND",
            env.get("XDS_ON_DEMAND", "true"),
            "false: DNS proxy does not currently support on-demand mode"
            " (or turn the DNS proxy off with ISTIO_META_DNS_CAPTURE=false)",
        )

    admin_port = _admin_port(env, pc)
    stats_port = integer("STATS_PORT", int(pc.get("statusPort") or PORT_STATS), maximum=65535)

    log_level = get("RUST_LOG") or get("LOG_LEVEL") or "info"
    try:
        parse_level_spec(log_level)
    except ValueError as e:
        raise ConfigError("RUST_LOG", log_level, str(e)) from None

    return Config(
        xds_address=xds_address,
        ca_address=ca_address,
        xds_root_cert=parse_root_cert(get("XDS_ROOT_CA", DEFAULT_ROOT_CERT) or DEFAULT_ROOT_CERT),
        ca_root_cert=parse_root_cert(get("CA_ROOT_CA", DEFAULT_ROOT_CERT) or DEFAULT_ROOT_CERT),
        alt_xds_hostname=get("ALT_XDS_HOSTNAME") or None,
        alt_ca_hostname=get("ALT_CA_HOSTNAME") or None,
        auth_token=get("AUTH_TOKEN", DEFAULT_TOKEN) or DEFAULT_TOKEN,
        cluster_id=cluster_id,
        cluster_domain=get("CLUSTER_DOMAIN", "cluster.local") or "cluster.local",
        trust_domain=get("TRUST_DOMAIN", "cluster.local") or "cluster.local",
        network=get("NETWORK", "") or "",
        node_name=get("NODE_NAME") or None,
        pod_name=get("POD_NAME", "") or "",
        pod_namespace=get("POD_NAMESPACE", "") or "",
        instance_ip=get("INSTANCE_IP") or "1.1.1.1",
        service_account=get("SERVICE_ACCOUNT", "") or "",
        xds_on_demand=xds_on_demand,
        local_xds_path=Path(local_xds_path) if local_xds_path else None,
        local_xds=local_xds or None,
        fake_ca=fake_ca,
        secret_ttl_s=duration("SECRET_TTL", 86400.0),
        xds_headers=_prefixed(env, "XDS_HEADER_"),
        ca_headers=_prefixed(env, "CA_HEADER_"),
        proxy_metadata=proxy_metadata,
        proxy_mode=proxy_mode,
        proxy_workload_info=workload_info,
        inpod_enabled=boolean("INPOD_ENABLED", True),
        inpod_uds=Path(get("INPOD_UDS", DEFAULT_INPOD_UDS) or DEFAULT_INPOD_UDS),
        inpod_port_reuse=boolean("INPOD_PORT_REUSE", True),
        packet_mark=integer("PACKET_MARK", DEFAULT_PACKET_MARK, maximum=0xFFFFFFFF),
        enable_orig_src=enable_orig_src,
        pool_max_streams_per_connection=integer("POOL_MAX_STREAMS_PER_CONNECTION", 100, minimum=1),
        pool_unused_release_timeout_s=duration("POOL_UNUSED_RELEASE_TIMEOUT", 300.0),
        http2_stream_window_size=integer(
            "HTTP2_STREAM_WINDOW_SIZE", 4 * 1024 * 1024, minimum=65535, maximum=2**31 - 1
        ),
        http2_connection_window_size=integer(
            "HTTP2_CONNECTION_WINDOW_SIZE", 16 * 1024 * 1024, minimum=65535, maximum=2**31 - 1
        ),
        http2_frame_size=integer(
            "HTTP2_FRAME_SIZE", 1024 * 1024, minimum=16384, maximum=16 * 1024 * 1024 - 1
        ),
        keepalive_enabled=boolean("KEEPALIVE_ENABLED", True),
        keepalive_time_s=duration("KEEPALIVE_TIME", 180.0),
        keepalive_interval_s=duration("KEEPALIVE_INTERVAL", 180.0),
        keepalive_retries=integer("KEEPALIVE_RETRIES", 9, minimum=1),
        user_timeout_enabled=boolean("USER_TIMEOUT_ENABLED", False),
        connection_termination_deadline_s=_termination_deadline(env),
        ipv6_enabled=boolean("IPV6_ENABLED", True),
        tls12_enabled=boolean("TLS12_ENABLED", False),
        enable_response_baggage=boolean("ENABLE_RESPONSE_BAGGAGE", True),
        localhost_app_tunnel=boolean("LOCALHOST_APP_TUNNEL", True),
        transparent_network_policies=boolean("TRANSPARENT_NETWORK_POLICIES", False),
        authz_policy_info_logging=boolean("AUTHZ_POLICY_INFO_LOGGING", False),
        dns_proxy=dns_proxy,
        dns_proxy_addr=dns_proxy_addr,
        access_log_errors_only=boolean("ACCESS_LOG_ERRORS_ONLY", False),
        admin_port=admin_port,
        stats_port=stats_port,
        readiness_port=integer("READINESS_PORT", PORT_READINESS, maximum=65535),
        log_level=log_level,
        log_format=parse_enum("LOG_FORMAT", get("LOG_FORMAT", "text") or "", LogFormat),
        redirect_mode=(
            parse_enum("REDIRECT_MODE", env["REDIRECT_MODE"], RedirectMode)
            if env.get("REDIRECT_MODE")
            else None
        ),
        local_ca_dir=Path(get("LOCAL_CA_DIR", DEFAULT_LOCAL_CA_DIR) or DEFAULT_LOCAL_CA_DIR),
        bpf_pin_path=_bpf_pin_path(env),
        bpf_cgroup_path=Path(env["BPF_CGROUP_PATH"]) if env.get("BPF_CGROUP_PATH") else None,
        bpf_object_dir=Path(env["BPF_OBJECT_DIR"]) if env.get("BPF_OBJECT_DIR") else None,
        dns_resolv_conf=Path(get("DNS_RESOLV_CONF") or DEFAULT_RESOLV_CONF),
        crl_path=Path(env["CRL_PATH"]) if env.get("CRL_PATH") else None,
        kernel_splice=_kernel_splice(get(KERNEL_SPLICE_ENV)),
        worker_threads=worker_threads(env, pc.get("concurrency"), len(os.sched_getaffinity(0))),
    )


KERNEL_SPLICE_ENV = "ZTUNNEL_PY_KERNEL_SPLICE"


def _kernel_splice(raw: str | None) -> bool | None:
    if raw is None or raw.strip().lower() in {"", "auto"}:
        return None
    try:
        return parse_bool(KERNEL_SPLICE_ENV, raw)
    except ConfigError:
        raise ConfigError(KERNEL_SPLICE_ENV, raw, "auto, true or false") from None


def _prefixed(env: Mapping[str, str], prefix: str) -> dict[str, str]:
    """``XDS_HEADER_FOO=bar`` becomes gRPC metadata ``foo: bar`` (HTTP/2 keys are lower-case)."""
    return {
        key.removeprefix(prefix).lower(): value
        for key, value in env.items()
        if key.startswith(prefix) and key != prefix
    }


# --- worker count (ztunnel's num_worker_threads) -----------------------------------------------

DEFAULT_WORKER_THREADS = 2  # ztunnel's floor for its CPU-aware default
WORKER_THREAD_CPU_FRACTION = 0.25  # ztunnel: a quarter of the cores when no limit is set


def parse_cpu_quantity(name: str, raw: str) -> int:
    """A Kubernetes CPU quantity ("2", "1.5", "500m") as whole CPUs, rounded up (ztunnel)."""
    text = raw.strip()
    try:
        cores = float(text[:-1]) / 1000 if text.endswith("m") else float(text)
    except ValueError:
        cores = float("nan")
    if not math.isfinite(cores) or cores <= 0:
        raise ConfigError(name, raw, "a positive CPU quantity such as 2, 1.5 or 500m")
    return math.ceil(cores)


def worker_threads(env: Mapping[str, str], concurrency: Any, cpus: int) -> int:
    """ztunnel's ``num_worker_threads``, with one deliberate difference in the default.

    As ztunnel: ``ZTUNNEL_WORKER_THREADS`` is a count, ``N%`` of the CPU count (rounded up,
    at least 1) or ``0`` for every CPU; else ProxyConfig ``concurrency`` (0: every CPU); else
    ``ZTUNNEL_RESOURCE_CPU_LIMIT`` raised to ``ZTUNNEL_RESOURCE_CPU_REQUEST``. The CPU count is
    ``ZTUNNEL_RESOURCE_CPU_LIMIT``, else ``ZTUNNEL_CPU_LIMIT`` (the chart's downward API),
    else the CPUs this process may use. When none of these is set ztunnel takes
    max(ceil(25% of the CPUs), 2, the request); we take 1: a worker here is a whole Python
    process (interpreter, modules, its own pools), not a thread, so extra ones are opted into
    (docs/configuration.md).
    """
    limit_raw = env.get("ZTUNNEL_RESOURCE_CPU_LIMIT")
    limit = parse_cpu_quantity("ZTUNNEL_RESOURCE_CPU_LIMIT", limit_raw) if limit_raw else None
    request_raw = env.get("ZTUNNEL_RESOURCE_CPU_REQUEST")
    request = parse_cpu_quantity("ZTUNNEL_RESOURCE_CPU_REQUEST", request_raw) if request_raw else 0

    def cpu_count() -> int:
        if limit is not None:
            return limit
        raw = env.get("ZTUNNEL_CPU_LIMIT")
        return parse_int("ZTUNNEL_CPU_LIMIT", raw, minimum=1) if raw else cpus

    raw = (env.get("ZTUNNEL_WORKER_THREADS") or "").strip()
    if raw.endswith("%"):
        try:
            percent = float(raw[:-1])
        except ValueError:
            percent = float("nan")
        if not 0 < percent <= 100:  # also refuses nan
            raise ConfigError(
                "ZTUNNEL_WORKER_THREADS", raw, "a percentage above 0 and at most 100%"
            )
        return max(1, math.ceil(cpu_count() * percent / 100))
    if raw:
        count = parse_int("ZTUNNEL_WORKER_THREADS", raw)
        return count or cpu_count()
    if concurrency is not None:
        count = parse_int("PROXY_CONFIG.concurrency", str(concurrency))
        return count or cpu_count()
    if limit is not None:
        return max(limit, request, 1)
    return 1
