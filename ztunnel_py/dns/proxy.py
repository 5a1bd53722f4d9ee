"""One DNS proxy per client: its sockets bound inside the client's netns, its server started.

In in-pod mode every enrolled pod gets UDP and TCP listeners on ``DNS_PROXY_ADDR`` (default
``localhost:15053``: 127.0.0.1, and ::1 when the pod has IPv6) inside its own netns, where
istio-cni's rules (or the BPF programs) send the pod's port-53 traffic; in dedicated mode the
same is done in the daemon's own netns. Every socket carries ``SO_MARK`` (0x539) and
``SO_REUSEPORT`` (``INPOD_PORT_REUSE``) like the pod's other listeners, and upstream queries
leave from the pod's netns, marked, so they are never captured again.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import random
import socket
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from ztunnel_py.config import Config, DnsProxyAddress, ProxyMode
from ztunnel_py.dns.resolvconf import ResolvConf, parse_resolv_conf
from ztunnel_py.dns.resolver import MeshResolver
from ztunnel_py.dns.telemetry import DnsMetrics
from ztunnel_py.netns import run_in_netns, socket_in_netns
from ztunnel_py.state.model import Workload
from ztunnel_py.state.store import ProxyState

if TYPE_CHECKING:  # dnspython: loaded with the first pod
    from ztunnel_py.dns.forwarder import UpstreamForwarder
    from ztunnel_py.dns.server import DnsServer

log = logging.getLogger(__name__)

_V6_UNAVAILABLE = (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT)


def read_resolv_conf(path: Path) -> ResolvConf:
    """The node's resolvers; an unreadable file leaves only the local host (and says so)."""
    try:
        text = path.read_text()
    except OSError as e:
        log.warning("cannot read %s (%s): the DNS proxy forwards to 127.0.0.1:53", path, e)
        text = ""
    conf = parse_resolv_conf(text)
    for problem in conf.problems:
        log.warning("%s: %s (ignored)", path, problem)
    return conf


def bind_dns_sockets(
    netns_fd: int | None,
    address: DnsProxyAddress,
    *,
    ipv6: bool = True,
    mark: int | None = None,
    reuse_port: bool = True,
) -> list[socket.socket]:
    """UDP and TCP sockets bound to ``address`` inside ``netns_fd`` (``None``: here).

    ``localhost`` skips ::1 when the netns has no IPv6; an explicit address must bind.
    """

    def make() -> list[socket.socket]:
        made: list[socket.socket] = []
        try:
            for host, port in address.bind_addresses(ipv6=ipv6):
                family = socket.AF_INET6 if ":" in host else socket.AF_INET
                for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
                    try:
                        made.append(_bound(family, kind, host, port, mark, reuse_port))
                    except OSError as e:
                        optional_v6 = address.host == "localhost" and family == socket.AF_INET6
                        if optional_v6 and e.errno in _V6_UNAVAILABLE:
                            break
                        raise
        except BaseException:
            for s in made:
                s.close()
            raise
        return made

    return make() if netns_fd is None else run_in_netns(netns_fd, make)


def _bound(
    family: int, kind: int, host: str, port: int, mark: int | None, reuse_port: bool
) -> socket.socket:
    sock = socket.socket(family, kind | socket.SOCK_CLOEXEC)
    try:
        if mark is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((host, port))
        if kind == socket.SOCK_STREAM:
            sock.listen(128)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def pod_forwarder(config: Config, conf: ResolvConf, netns_fd: int | None) -> UpstreamForwarder:
    """Forwarding to ``conf``'s servers from sockets made in the pod's netns, marked."""
    # dnspython (2.2 MiB) loads with the first pod's DNS proxy, not at idle.
    from ztunnel_py.dns.forwarder import UpstreamForwarder

    mark = config.packet_mark

    def upstream_socket(family: int, kind: int) -> socket.socket:
        sock = socket_in_netns(netns_fd, family, kind)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        return sock

    return UpstreamForwarder(conf, upstream_socket)


class DnsProxyStarter:
    """Starts the DNS proxy of each pod (or of the dedicated workload) from ``Config``."""

    def __init__(
        self,
        config: Config,
        state: ProxyState,
        *,
        metrics: DnsMetrics | None,
        resolv_conf: ResolvConf,
        rng: random.Random | None = None,
    ) -> None:
        self.config = config
        self.state = state
        self.metrics = metrics
        self.resolv_conf = resolv_conf
        self.rng = rng or random.Random()
        # Shared mode: each pod's own Kubernetes search path; dedicated: the node's.
        static_search = resolv_conf.search if config.proxy_mode is ProxyMode.DEDICATED else None
        self.resolver = MeshResolver(
            state,
            cluster_domain=config.cluster_domain,
            ipv6_enabled=config.ipv6_enabled,
            static_search_domains=static_search,
            rng=self.rng,
        )

    async def start(self, netns_fd: int | None, client: Callable[[], Workload | None]) -> DnsServer:
        """Bind in ``netns_fd`` and serve; raises ``OSError`` when the address is taken."""
        from ztunnel_py.dns.server import DnsServer  # dnspython: see pod_forwarder

        config = self.config
        sockets = bind_dns_sockets(
            netns_fd,
            config.dns_proxy_addr,
            ipv6=config.ipv6_enabled,
            mark=config.packet_mark,
            reuse_port=config.inpod_port_reuse,
        )
        server = DnsServer(
            resolver=self.resolver,
            client=client,
            forwarder=pod_forwarder(config, self.resolv_conf, netns_fd),
            metrics=self.metrics,
        )
        try:
            await server.start(sockets)
        except BaseException:
            await server.stop()
            for s in sockets:
                with contextlib.suppress(OSError):
                    s.close()
            raise
        return server
