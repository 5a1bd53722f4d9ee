"""Environment parsing: ztunnel's names and defaults, and a clear error for every bad value."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from ztunnel_py import config as c
from ztunnel_py.errors import ConfigError


def test_defaults_match_ztunnel() -> None:
    cfg = c.from_env({})
    assert cfg.xds_address == "https://localhost:15012"
    assert cfg.ca_address == "https://localhost:15012"
    assert cfg.xds_root_cert == c.RootCert(
        c.RootCertKind.FILE, "./var/run/secrets/istio/root-cert.pem"
    )
    assert cfg.auth_token == "./var/run/secrets/tokens/istio-token"
    assert cfg.cluster_id == "Kubernetes"
    assert cfg.cluster_domain == "cluster.local"
    assert cfg.trust_domain == "cluster.local"
    assert cfg.network == ""
    assert cfg.instance_ip == "1.1.1.1"
    assert cfg.secret_ttl_s == 86400
    assert cfg.proxy_mode is c.ProxyMode.SHARED
    assert cfg.inpod_uds == Path("/var/run/ztunnel/ztunnel.sock")
    assert cfg.inpod_port_reuse is True
    assert cfg.packet_mark == 1337
    assert cfg.pool_max_streams_per_connection == 100
    assert cfg.pool_unused_release_timeout_s == 300
    assert (
        cfg.http2_stream_window_size,
        cfg.http2_connection_window_size,
        cfg.http2_frame_size,
    ) == (
        4 * 1024 * 1024,
        16 * 1024 * 1024,
        1024 * 1024,
    )
    assert (cfg.keepalive_time_s, cfg.keepalive_interval_s, cfg.keepalive_retries) == (180, 180, 9)
    assert cfg.keepalive_enabled and not cfg.user_timeout_enabled
    assert cfg.connection_termination_deadline_s == 5
    assert cfg.ipv6_enabled and not cfg.tls12_enabled and cfg.enable_response_baggage
    assert (cfg.admin_port, cfg.stats_port, cfg.readiness_port) == (15000, 15020, 15021)
    assert cfg.redirect_mode is None  # auto: eBPF where the kernel allows
    assert cfg.log_format is c.LogFormat.TEXT


def test_in_kubernetes_the_default_istiod_is_the_service() -> None:
    cfg = c.from_env({"KUBERNETES_SERVICE_HOST": "10.0.0.1"})
    assert cfg.xds_address == "https://istiod.istio-system.svc:15012"
    assert cfg.ca_address == "https://istiod.istio-system.svc:15012"


def test_local_config_alone_needs_no_istiod() -> None:
    cfg = c.from_env({"LOCAL_XDS_PATH": "examples/localhost.yaml"})
    assert cfg.uses_local_xds and cfg.local_xds_path == Path("examples/localhost.yaml")
    assert cfg.xds_address is None
    assert cfg.ca_address is None
    assert cfg.uses_local_ca


def test_local_config_with_explicit_istiod_keeps_both() -> None:
    cfg = c.from_env({"LOCAL_XDS": "workloads: []", "XDS_ADDRESS": "istiod:15012"})
    assert cfg.xds_address == "https://istiod:15012"
    assert cfg.local_xds == "workloads: []"


def test_empty_xds_address_disables_xds() -> None:
    assert c.from_env({"XDS_ADDRESS": ""}).xds_address is None


def test_fake_ca_disables_the_ca_address() -> None:
    cfg = c.from_env({"FAKE_CA": "true", "CA_ADDRESS": "istiod:15012"})
    assert cfg.fake_ca and cfg.ca_address is None and not cfg.uses_local_ca


@pytest.mark.parametrize(
    ("env", "attr", "expected"),
    [
        (
            {"XDS_ADDRESS": "istiod.istio-system.svc:15012"},
            "xds_address",
            "https://istiod.istio-system.svc:15012",
        ),
        ({"CA_ADDRESS": "https://ca.example:15012"}, "ca_address", "https://ca.example:15012"),
        ({"XDS_ROOT_CA": "SYSTEM"}, "xds_root_cert", c.RootCert(c.RootCertKind.SYSTEM)),
        (
            {"CA_ROOT_CA": "/etc/ca.pem"},
            "ca_root_cert",
            c.RootCert(c.RootCertKind.FILE, "/etc/ca.pem"),
        ),
        (
            {"XDS_ROOT_CA": "-----BEGIN CERTIFICATE-----\nx\n-----END CERTIFICATE-----"},
            "xds_root_cert",
            c.RootCert(
                c.RootCertKind.INLINE, "-----BEGIN CERTIFICATE-----\nx\n-----END CERTIFICATE-----"
            ),
        ),
        ({"ALT_XDS_HOSTNAME": "istiod.alt"}, "alt_xds_hostname", "istiod.alt"),
        ({"ALT_CA_HOSTNAME": "ca.alt"}, "alt_ca_hostname", "ca.alt"),
        ({"AUTH_TOKEN": "/tmp/token"}, "auth_token", "/tmp/token"),
        ({"CLUSTER_ID": "east"}, "cluster_id", "east"),
        ({"CLUSTER_ID": "east", "ISTIO_META_CLUSTER_ID": "west"}, "cluster_id", "west"),
        ({"CLUSTER_DOMAIN": "corp.local"}, "cluster_domain", "corp.local"),
        ({"TRUST_DOMAIN": "example.org"}, "trust_domain", "example.org"),
        ({"NETWORK": "net-a"}, "network", "net-a"),
        ({"NODE_NAME": "node-1"}, "node_name", "node-1"),
        ({"POD_NAME": "ztunnel-abc"}, "pod_name", "ztunnel-abc"),
        ({"POD_NAMESPACE": "istio-system"}, "pod_namespace", "istio-system"),
        ({"INSTANCE_IP": "10.1.2.3"}, "instance_ip", "10.1.2.3"),
        ({"SERVICE_ACCOUNT": "ztunnel"}, "service_account", "ztunnel"),
        ({"XDS_ON_DEMAND": "true", "ISTIO_META_DNS_CAPTURE": "false"}, "xds_on_demand", True),
        ({"SECRET_TTL": "12h"}, "secret_ttl_s", 43200),
        ({"SECRET_TTL": "1h30m"}, "secret_ttl_s", 5400),
        (
            {"PROXY_MODE": "dedicated", "PROXY_WORKLOAD_INFO": "ns/pod/sa"},
            "proxy_mode",
            c.ProxyMode.DEDICATED,
        ),
        (
            {"PROXY_WORKLOAD_INFO": "ns/pod/sa"},
            "proxy_workload_info",
            c.WorkloadInfo("ns", "pod", "sa"),
        ),
        ({"INPOD_ENABLED": "false"}, "inpod_enabled", False),
        ({"INPOD_UDS": "/run/zt.sock"}, "inpod_uds", Path("/run/zt.sock")),
        ({"INPOD_PORT_REUSE": "false"}, "inpod_port_reuse", False),
        ({"PACKET_MARK": "0x539"}, "packet_mark", 1337),
        ({"ENABLE_ORIG_SRC": "false"}, "enable_orig_src", False),
        ({"POOL_MAX_STREAMS_PER_CONNECTION": "10"}, "pool_max_streams_per_connection", 10),
        ({"POOL_UNUSED_RELEASE_TIMEOUT": "30s"}, "pool_unused_release_timeout_s", 30),
        ({"HTTP2_STREAM_WINDOW_SIZE": "1048576"}, "http2_stream_window_size", 1048576),
        ({"HTTP2_CONNECTION_WINDOW_SIZE": "2097152"}, "http2_connection_window_size", 2097152),
        ({"HTTP2_FRAME_SIZE": "16384"}, "http2_frame_size", 16384),
        ({"KEEPALIVE_ENABLED": "false"}, "keepalive_enabled", False),
        ({"KEEPALIVE_TIME": "60s"}, "keepalive_time_s", 60),
        ({"KEEPALIVE_INTERVAL": "10s"}, "keepalive_interval_s", 10),
        ({"KEEPALIVE_RETRIES": "3"}, "keepalive_retries", 3),
        ({"USER_TIMEOUT_ENABLED": "true"}, "user_timeout_enabled", True),
        ({"CONNECTION_TERMINATION_DEADLINE": "30s"}, "connection_termination_deadline_s", 30),
        ({"TERMINATION_GRACE_PERIOD_SECONDS": "30"}, "connection_termination_deadline_s", 25),
        ({"TERMINATION_GRACE_PERIOD_SECONDS": "8"}, "connection_termination_deadline_s", 7),
        ({"IPV6_ENABLED": "false"}, "ipv6_enabled", False),
        ({"TLS12_ENABLED": "true"}, "tls12_enabled", True),
        ({"ENABLE_RESPONSE_BAGGAGE": "false"}, "enable_response_baggage", False),
        ({"AUTHZ_POLICY_INFO_LOGGING": "true"}, "authz_policy_info_logging", True),
        ({"ACCESS_LOG_ERRORS_ONLY": "true"}, "access_log_errors_only", True),
        ({"RUST_LOG": "debug"}, "log_level", "debug"),
        ({"LOG_FORMAT": "json"}, "log_format", c.LogFormat.JSON),
        ({"REDIRECT_MODE": "iptables"}, "redirect_mode", c.RedirectMode.IPTABLES),
        ({"REDIRECT_MODE": "ebpf"}, "redirect_mode", c.RedirectMode.EBPF),
        ({"ZTUNNEL_PY_KERNEL_SPLICE": "false"}, "kernel_splice", False),
        ({"ZTUNNEL_PY_KERNEL_SPLICE": "true"}, "kernel_splice", True),
        ({"ZTUNNEL_PY_KERNEL_SPLICE": "auto"}, "kernel_splice", None),
        ({}, "kernel_splice", None),
        ({"LOCAL_CA_DIR": "/var/lib/x"}, "local_ca_dir", Path("/var/lib/x")),
        ({"BPF_PIN_PATH": "/sys/fs/bpf/other"}, "bpf_pin_path", Path("/sys/fs/bpf/other")),
        (
            {"BPF_CGROUP_PATH": "/sys/fs/cgroup/kubepods"},
            "bpf_cgroup_path",
            Path("/sys/fs/cgroup/kubepods"),
        ),
        ({"BPF_OBJECT_DIR": "/opt/zt/bpf"}, "bpf_object_dir", Path("/opt/zt/bpf")),
        ({"PROXY_CONFIG": "proxyAdminPort: 16000\nstatusPort: 16020"}, "admin_port", 16000),
        ({"PROXY_CONFIG": "proxyAdminPort: 16000\nstatusPort: 16020"}, "stats_port", 16020),
        ({"READINESS_PORT": "16021"}, "readiness_port", 16021),
        ({}, "dns_proxy", True),
        ({"ISTIO_META_DNS_CAPTURE": "true"}, "dns_proxy", True),
        ({"ISTIO_META_DNS_CAPTURE": "TRUE"}, "dns_proxy", True),
        ({"ISTIO_META_DNS_CAPTURE": "false"}, "dns_proxy", False),
        ({"ISTIO_META_DNS_CAPTURE": "no"}, "dns_proxy", False),
        ({"PROXY_CONFIG": "proxyMetadata: {DNS_CAPTURE: false}"}, "dns_proxy", False),
        ({}, "dns_proxy_addr", c.DnsProxyAddress("localhost", 15053)),
        (
            {"ISTIO_META_DNS_PROXY_ADDR": "localhost:16053"},
            "dns_proxy_addr",
            c.DnsProxyAddress("localhost", 16053),
        ),
        (
            {"ISTIO_META_DNS_PROXY_ADDR": "10.0.0.1:53"},
            "dns_proxy_addr",
            c.DnsProxyAddress("10.0.0.1", 53),
        ),
        (
            {"ISTIO_META_DNS_PROXY_ADDR": "[::1]:15053"},
            "dns_proxy_addr",
            c.DnsProxyAddress("::1", 15053),
        ),
        # IPv6 text forms as Rust's SocketAddr reads them: canonical form, IPv4-mapped stays
        # IPv6, a numeric zone is kept.
        (
            {"ISTIO_META_DNS_PROXY_ADDR": "[2001:DB8:0:0::1]:53"},
            "dns_proxy_addr",
            c.DnsProxyAddress("2001:db8::1", 53),
        ),
        (
            {"ISTIO_META_DNS_PROXY_ADDR": "[::ffff:127.0.0.1]:15053"},
            "dns_proxy_addr",
            c.DnsProxyAddress(str(ipaddress.ip_address("::ffff:127.0.0.1")), 15053),
        ),
        (
            {"ISTIO_META_DNS_PROXY_ADDR": "[fe80::1%2]:15053"},
            "dns_proxy_addr",
            c.DnsProxyAddress("fe80::1%2", 15053),
        ),
        ({"DNS_RESOLV_CONF": "/tmp/r.conf"}, "dns_resolv_conf", Path("/tmp/r.conf")),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_each_variable(env: dict[str, str], attr: str, expected: object) -> None:
    assert getattr(c.from_env(env), attr) == expected


def test_headers_and_metadata() -> None:
    cfg = c.from_env(
        {
            "XDS_HEADER_X_TENANT": "blue",
            "CA_HEADER_X_TENANT": "green",
            "ISTIO_META_FOO": "bar",
            "ISTIO_METAJSON_LABELS": '{"app": "ztunnel"}',
            "PROXY_CONFIG": "proxyMetadata: {FROM_PC: x, FLAG: true}",
        }
    )
    assert cfg.xds_headers == {"x_tenant": "blue"}
    assert cfg.ca_headers == {"x_tenant": "green"}
    assert cfg.proxy_metadata["FOO"] == "bar"
    assert cfg.proxy_metadata["LABELS"] == {"app": "ztunnel"}
    assert cfg.proxy_metadata["FROM_PC"] == "x"
    assert cfg.proxy_metadata["FLAG"] == "true"


def test_mesh_config_file_default_config(tmp_path: Path) -> None:
    mesh = tmp_path / "mesh"
    mesh.write_text(
        "defaultConfig:\n  discoveryAddress: istiod.custom:15012\n  proxyMetadata: {A: b}\n"
    )
    cfg = c.from_env({"MESH_CONFIG_PATH": str(mesh)})
    assert cfg.xds_address == "https://istiod.custom:15012"
    assert cfg.proxy_metadata["A"] == "b"


@pytest.mark.parametrize(
    ("env", "name", "expected_words"),
    [
        ({"XDS_ON_DEMAND": "maybe"}, "XDS_ON_DEMAND", "boolean"),
        ({"FAKE_CA": "yesno"}, "FAKE_CA", "boolean"),
        ({"INPOD_ENABLED": "2"}, "INPOD_ENABLED", "boolean"),
        ({"INPOD_PORT_REUSE": "x"}, "INPOD_PORT_REUSE", "boolean"),
        ({"KEEPALIVE_ENABLED": "x"}, "KEEPALIVE_ENABLED", "boolean"),
        ({"USER_TIMEOUT_ENABLED": "x"}, "USER_TIMEOUT_ENABLED", "boolean"),
        ({"IPV6_ENABLED": "x"}, "IPV6_ENABLED", "boolean"),
        ({"TLS12_ENABLED": "x"}, "TLS12_ENABLED", "boolean"),
        ({"ENABLE_RESPONSE_BAGGAGE": "x"}, "ENABLE_RESPONSE_BAGGAGE", "boolean"),
        ({"AUTHZ_POLICY_INFO_LOGGING": "x"}, "AUTHZ_POLICY_INFO_LOGGING", "boolean"),
        ({"ACCESS_LOG_ERRORS_ONLY": "sometimes"}, "ACCESS_LOG_ERRORS_ONLY", "boolean"),
        ({"ENABLE_ORIG_SRC": "auto-ish"}, "ENABLE_ORIG_SRC", "boolean"),
        ({"SECRET_TTL": "forever"}, "SECRET_TTL", "duration"),
        ({"SECRET_TTL": "10"}, "SECRET_TTL", "duration"),
        ({"POOL_UNUSED_RELEASE_TIMEOUT": "5 minutes"}, "POOL_UNUSED_RELEASE_TIMEOUT", "duration"),
        ({"KEEPALIVE_TIME": ""}, "KEEPALIVE_TIME", "duration"),
        ({"KEEPALIVE_INTERVAL": "1x"}, "KEEPALIVE_INTERVAL", "duration"),
        (
            {"CONNECTION_TERMINATION_DEADLINE": "soon"},
            "CONNECTION_TERMINATION_DEADLINE",
            "duration",
        ),
        ({"TERMINATION_GRACE_PERIOD_SECONDS": "-1"}, "TERMINATION_GRACE_PERIOD_SECONDS", "integer"),
        ({"KEEPALIVE_RETRIES": "0"}, "KEEPALIVE_RETRIES", "at least 1"),
        ({"POOL_MAX_STREAMS_PER_CONNECTION": "0"}, "POOL_MAX_STREAMS_PER_CONNECTION", "at least 1"),
        ({"POOL_MAX_STREAMS_PER_CONNECTION": "lots"}, "POOL_MAX_STREAMS_PER_CONNECTION", "integer"),
        ({"HTTP2_STREAM_WINDOW_SIZE": "100"}, "HTTP2_STREAM_WINDOW_SIZE", "at least 65535"),
        (
            {"HTTP2_CONNECTION_WINDOW_SIZE": "99999999999"},
            "HTTP2_CONNECTION_WINDOW_SIZE",
            "at most",
        ),
        ({"HTTP2_FRAME_SIZE": "1024"}, "HTTP2_FRAME_SIZE", "at least 16384"),
        ({"PACKET_MARK": "mark"}, "PACKET_MARK", "integer"),
        ({"READINESS_PORT": "70000"}, "READINESS_PORT", "at most 65535"),
        ({"PROXY_MODE": "sidecar"}, "PROXY_MODE", "shared or dedicated"),
        ({"PROXY_MODE": "dedicated"}, "PROXY_WORKLOAD_INFO", "namespace/name/serviceaccount"),
        ({"PROXY_WORKLOAD_INFO": "ns/pod"}, "PROXY_WORKLOAD_INFO", "namespace/name/serviceaccount"),
        ({"REDIRECT_MODE": "tc"}, "REDIRECT_MODE", "ebpf or iptables"),
        (
            {"ZTUNNEL_PY_KERNEL_SPLICE": "sometimes"},
            "ZTUNNEL_PY_KERNEL_SPLICE",
            "auto, true or false",
        ),
        ({"LOG_FORMAT": "xml"}, "LOG_FORMAT", "text or json"),
        ({"RUST_LOG": "verbose"}, "RUST_LOG", "unknown log level"),
        ({"RUST_LOG": "ztunnel::proxy=loud"}, "RUST_LOG", "unknown log level"),
        ({"XDS_ADDRESS": "ftp://istiod:15012"}, "XDS_ADDRESS", "address"),
        ({"CA_ADDRESS": "istiod:port"}, "CA_ADDRESS", "address"),
        ({"LOCAL_XDS_PATH": "a.yaml", "LOCAL_XDS": "workloads: []"}, "LOCAL_XDS", "pick one"),
        ({"ISTIO_METAJSON_X": "{not json"}, "ISTIO_METAJSON_X", "JSON"),
        ({"PROXY_CONFIG": "[1, 2"}, "PROXY_CONFIG", "YAML"),
        ({"PROXY_CONFIG": "- a"}, "PROXY_CONFIG", "mapping"),
        (
            {"XDS_ON_DEMAND": "true", "ISTIO_META_DNS_CAPTURE": "true"},
            "XDS_ON_DEMAND",
            "DNS proxy does not currently support on-demand mode",
        ),
        ({"XDS_ON_DEMAND": "true"}, "XDS_ON_DEMAND", "ISTIO_META_DNS_CAPTURE=false"),
        ({"ISTIO_META_DNS_PROXY_ADDR": "15053"}, "ISTIO_META_DNS_PROXY_ADDR", "localhost:<port>"),
        ({"ISTIO_META_DNS_PROXY_ADDR": "host:53"}, "ISTIO_META_DNS_PROXY_ADDR", "<ip>:<port>"),
        ({"ISTIO_META_DNS_PROXY_ADDR": "::1:53"}, "ISTIO_META_DNS_PROXY_ADDR", "[<ipv6>]"),
        ({"ISTIO_META_DNS_PROXY_ADDR": "localhost:0"}, "ISTIO_META_DNS_PROXY_ADDR", "<port>"),
        (
            {"ISTIO_META_DNS_PROXY_ADDR": "[fe80::1%eth0]:15053"},
            "ISTIO_META_DNS_PROXY_ADDR",
            "a numeric IPv6 zone",
        ),
        ({"ISTIO_META_DNS_PROXY_ADDR": "fe80::1%2:53"}, "ISTIO_META_DNS_PROXY_ADDR", "[<ipv6>]"),
    ],
)
def test_bad_values_name_the_variable(env: dict[str, str], name: str, expected_words: str) -> None:
    with pytest.raises(ConfigError) as info:
        c.from_env(env)
    assert info.value.name == name
    message = str(info.value)
    assert name in message
    assert expected_words in message


def test_dump_redacts_secrets_and_uses_camel_case() -> None:
    cfg = c.from_env({"LOCAL_XDS": "workloads: []", "AUTH_TOKEN": "secret-token"})
    dump = cfg.to_dump()
    assert dump["localXds"] == "<redacted>"
    assert dump["authToken"] == "<redacted>"
    assert dump["redirectMode"] is None
    assert dump["connectionTerminationDeadlineS"] == 5.0


def test_admin_port_and_pin_path_alone_read_as_the_daemon_reads_them(tmp_path: Path) -> None:
    mesh = tmp_path / "mesh"
    mesh.write_text("defaultConfig:\n  proxyAdminPort: 16000\n")
    env = {"MESH_CONFIG_PATH": str(mesh)}
    assert c.admin_port_from_env(env) == c.from_env(env).admin_port == 16000
    assert c.admin_port_from_env({**env, "ADMIN_PORT": "17000"}) == 17000
    with pytest.raises(ConfigError, match="ADMIN_PORT"):
        c.admin_port_from_env({**env, "ADMIN_PORT": "99999"})
    assert c.bpf_pin_path_from_env({}) == Path(c.DEFAULT_BPF_PIN_PATH)
    assert (
        c.bpf_pin_path_from_env({"BPF_PIN_PATH": "/x"})
        == c.from_env({"BPF_PIN_PATH": "/x", **env}).bpf_pin_path
    )


def test_config_dump_command_refuses_a_bad_admin_port(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from ztunnel_py.cli import EXIT_CONFIG, main

    monkeypatch.setenv("ADMIN_PORT", "not-a-port")
    assert main(["config-dump"]) == EXIT_CONFIG
    assert "ADMIN_PORT" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("env", "concurrency", "cpus", "expected"),
    [
        ({}, None, 16, 1),  # ours: one process unless asked (ztunnel: max(25%, 2))
        ({"ZTUNNEL_WORKER_THREADS": "4"}, None, 2, 4),
        ({"ZTUNNEL_WORKER_THREADS": "0"}, None, 3, 3),  # every CPU
        ({"ZTUNNEL_WORKER_THREADS": "0", "ZTUNNEL_CPU_LIMIT": "6"}, None, 3, 6),
        ({"ZTUNNEL_WORKER_THREADS": "50%", "ZTUNNEL_CPU_LIMIT": "8"}, None, 2, 4),
        ({"ZTUNNEL_WORKER_THREADS": "30%", "ZTUNNEL_CPU_LIMIT": "16"}, None, 2, 5),  # rounds up
        ({"ZTUNNEL_WORKER_THREADS": "10%", "ZTUNNEL_CPU_LIMIT": "4"}, None, 2, 1),
        ({"ZTUNNEL_WORKER_THREADS": "50%", "ZTUNNEL_CPU_LIMIT": "12"}, None, 2, 6),
        # an explicit resource limit is the CPU count before ZTUNNEL_CPU_LIMIT
        (
            {
                "ZTUNNEL_WORKER_THREADS": "100%",
                "ZTUNNEL_CPU_LIMIT": "12",
                "ZTUNNEL_RESOURCE_CPU_LIMIT": "3",
            },
            None,
            2,
            3,
        ),
        ({}, 3, 8, 3),  # ProxyConfig concurrency
        ({}, 0, 8, 8),
        ({"ZTUNNEL_WORKER_THREADS": "2"}, 5, 8, 2),  # the env var wins
        ({"ZTUNNEL_RESOURCE_CPU_LIMIT": "500m"}, None, 8, 1),  # a limit is the count
        ({"ZTUNNEL_RESOURCE_CPU_LIMIT": "2.5"}, None, 8, 3),
        ({"ZTUNNEL_RESOURCE_CPU_LIMIT": "1", "ZTUNNEL_RESOURCE_CPU_REQUEST": "3"}, None, 8, 3),
        ({"ZTUNNEL_RESOURCE_CPU_REQUEST": "3"}, None, 8, 1),  # a request alone: as unset
    ],
)
def test_worker_threads_as_ztunnel_computes_them(
    env: dict[str, str], concurrency: int | None, cpus: int, expected: int
) -> None:
    assert c.worker_threads(env, concurrency, cpus) == expected


@pytest.mark.parametrize(
    ("env", "name"),
    [
        ({"ZTUNNEL_WORKER_THREADS": "lots"}, "ZTUNNEL_WORKER_THREADS"),
        ({"ZTUNNEL_WORKER_THREADS": "0%"}, "ZTUNNEL_WORKER_THREADS"),
        ({"ZTUNNEL_WORKER_THREADS": "150%"}, "ZTUNNEL_WORKER_THREADS"),
        ({"ZTUNNEL_WORKER_THREADS": "x%"}, "ZTUNNEL_WORKER_THREADS"),
        ({"ZTUNNEL_WORKER_THREADS": "-1"}, "ZTUNNEL_WORKER_THREADS"),
        ({"ZTUNNEL_WORKER_THREADS": "0", "ZTUNNEL_CPU_LIMIT": "0"}, "ZTUNNEL_CPU_LIMIT"),
        ({"ZTUNNEL_RESOURCE_CPU_LIMIT": "-2"}, "ZTUNNEL_RESOURCE_CPU_LIMIT"),
        ({"ZTUNNEL_RESOURCE_CPU_REQUEST": "1Gi"}, "ZTUNNEL_RESOURCE_CPU_REQUEST"),
    ],
)
def test_bad_worker_settings_name_the_variable(env: dict[str, str], name: str) -> None:
    with pytest.raises(ConfigError, match=name):
        c.from_env({"LOCAL_XDS_PATH": "/x", **env})


def test_worker_threads_reach_the_config() -> None:
    assert c.from_env({"LOCAL_XDS_PATH": "/x"}).worker_threads == 1
    assert c.from_env({"LOCAL_XDS_PATH": "/x", "ZTUNNEL_WORKER_THREADS": "3"}).worker_threads == 3
    pc = "concurrency: 2\n"
    assert c.from_env({"LOCAL_XDS_PATH": "/x", "PROXY_CONFIG": pc}).worker_threads == 2


def test_crl_path_enables_revocation_checks() -> None:
    assert c.from_env({}).crl_path is None
    assert c.from_env({"CRL_PATH": ""}).crl_path is None
    cfg = c.from_env({"CRL_PATH": "/var/run/secrets/istio/crl/ca-crl.pem"})
    assert cfg.crl_path == Path("/var/run/secrets/istio/crl/ca-crl.pem")
    assert cfg.to_dump()["crlPath"] == "/var/run/secrets/istio/crl/ca-crl.pem"
