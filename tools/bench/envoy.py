"""The Envoy HBONE pair the benchmark compares against: sidecar-style configs for Envoy 1.40.

* client side (in the client pod): iptables ``REDIRECT`` to :15001, ``original_dst``,
  ``tcp_proxy`` tunneling the connection over HTTP/2 CONNECT + mTLS to the server pod's :15008;
* server side (in the server pod): :15008 terminating CONNECT (mTLS, SPIFFE SAN checked), one
  route per application port to the application on the pod's address.

Both check the peer's SPIFFE URI SAN, as Istio's sidecars do.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ztunnel_py.testing.envoy import (
    TYPE_PREFIX,
    CertFiles,
    admin_address,
    h2_windows,
    static_cluster,
    tls_context,
)

HBONE_PORT = 15008
OUTBOUND_PORT = 15001


def redirect_argv() -> list[str]:
    """The client pod's outbound capture: everything but loopback and HBONE goes to :15001."""
    return [
        "iptables", "-t", "nat", "-A", "OUTPUT", "-p", "tcp",
        "!", "-d", "127.0.0.0/8", "!", "--dport", str(HBONE_PORT),
        "-m", "mark", "!", "--mark", "0x539/0xfff",
        "-j", "REDIRECT", "--to-ports", str(OUTBOUND_PORT),
    ]  # fmt: skip


def client_config(
    *, server_ip: str, cert: Path, key: Path, root: Path, server_id: str, admin_port: int
) -> dict[str, Any]:
    hbone = static_cluster("hbone", server_ip, HBONE_PORT)
    hbone["typed_extension_protocol_options"] = {
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": TYPE_PREFIX + "extensions.upstreams.http.v3.HttpProtocolOptions",
            "explicit_http_config": {"http2_protocol_options": h2_windows()},
        }
    }
    hbone["transport_socket"] = {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": TYPE_PREFIX + "extensions.transport_sockets.tls.v3.UpstreamTlsContext",
            "common_tls_context": tls_context(CertFiles(cert, key, root), [server_id]),
        },
    }
    tcp_proxy = {
        "@type": TYPE_PREFIX + "extensions.filters.network.tcp_proxy.v3.TcpProxy",
        "stat_prefix": "hbone_out",
        "cluster": "hbone",
        "tunneling_config": {"hostname": "%DOWNSTREAM_LOCAL_ADDRESS%"},
    }
    original_dst = {
        "name": "envoy.filters.listener.original_dst",
        "typed_config": {
            "@type": TYPE_PREFIX + "extensions.filters.listener.original_dst.v3.OriginalDst"
        },
    }
    listener = {
        "name": "outbound",
        "address": {"socket_address": {"address": "0.0.0.0", "port_value": OUTBOUND_PORT}},
        "listener_filters": [original_dst],
        "filter_chains": [
            {"filters": [{"name": "envoy.filters.network.tcp_proxy", "typed_config": tcp_proxy}]}
        ],
    }
    return {
        "admin": admin_address(admin_port),
        "static_resources": {"listeners": [listener], "clusters": [hbone]},
    }


def server_config(
    *,
    server_ip: str,
    app_ports: Sequence[int],
    cert: Path,
    key: Path,
    root: Path,
    client_id: str,
    admin_port: int,
) -> dict[str, Any]:
    connect_route = {
        "match": {"connect_matcher": {}},
        "upgrade_configs": [{"upgrade_type": "CONNECT", "connect_config": {}}],
    }
    hcm = {
        "@type": TYPE_PREFIX
        + "extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "hbone_in",
        "codec_type": "HTTP2",
        "http2_protocol_options": {**h2_windows(), "allow_connect": True},
        "upgrade_configs": [{"upgrade_type": "CONNECT"}],
        "route_config": {
            "name": "local",
            "virtual_hosts": [
                {
                    "name": f"app{port}",
                    "domains": [f"{server_ip}:{port}"],
                    "routes": [
                        {
                            "match": connect_route["match"],
                            "route": {
                                "cluster": f"app{port}",
                                "upgrade_configs": connect_route["upgrade_configs"],
                            },
                        }
                    ],
                }
                for port in app_ports
            ],
        },
        "http_filters": [
            {
                "name": "envoy.filters.http.router",
                "typed_config": {"@type": TYPE_PREFIX + "extensions.filters.http.router.v3.Router"},
            }
        ],
    }
    tls = {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": TYPE_PREFIX + "extensions.transport_sockets.tls.v3.DownstreamTlsContext",
            "require_client_certificate": True,
            "common_tls_context": tls_context(CertFiles(cert, key, root), [client_id]),
        },
    }
    listener = {
        "name": "hbone",
        "address": {"socket_address": {"address": "0.0.0.0", "port_value": HBONE_PORT}},
        "filter_chains": [
            {
                "transport_socket": tls,
                "filters": [
                    {"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}
                ],
            }
        ],
    }
    return {
        "admin": admin_address(admin_port),
        "static_resources": {
            "listeners": [listener],
            "clusters": [static_cluster(f"app{p}", server_ip, p) for p in app_ports],
        },
    }
