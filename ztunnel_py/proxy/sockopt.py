"""Socket options the proxy needs: SO_ORIGINAL_DST, marks, keepalives, transparent binds.

``SoOriginalDst`` is the ``OriginalDestination`` of iptables mode (REDIRECT keeps the original
destination in conntrack, where ``SO_ORIGINAL_DST`` reads it); eBPF mode supplies its own.
``PodSocketFactory`` makes upstream sockets as ztunnel does: inside the pod's network namespace,
marked 0x539 so redirection never captures the daemon's own traffic, with TCP keepalives from
``Config``, and bound to the original client's IP when original-source spoofing is on.
"""

from __future__ import annotations

import ipaddress
import socket
import struct

from ztunnel_py.config import ORIG_SRC_MARK, Config
from ztunnel_py.netns import socket_in_netns
from ztunnel_py.proxy.sockets import SpoofedSources
from ztunnel_py.state.model import IPAddress

SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h
IP6T_SO_ORIGINAL_DST = 80  # linux/netfilter_ipv6/ip6_tables.h
IP_TRANSPARENT = 19
IP_FREEBIND = 15
IPV6_TRANSPARENT = 75
IPV6_FREEBIND = 78

SocketAddr = tuple[IPAddress, int]


class OriginalDestinationError(OSError):
    """The accepted socket carries no original destination (it was not redirected)."""


def original_destination(sock: socket.socket) -> SocketAddr:
    """SO_ORIGINAL_DST (IPv4) / IP6T_SO_ORIGINAL_DST (IPv6) of a redirected connection."""
    try:
        # A dual-stack [::] listener accepts IPv4 clients as v4-mapped peers; their conntrack
        # entry is IPv4, so only the IPv4 option answers for them.
        if sock.family == socket.AF_INET6 and not _is_v4_mapped(sock.getpeername()[0]):
            raw = sock.getsockopt(socket.IPPROTO_IPV6, IP6T_SO_ORIGINAL_DST, 28)
            port = struct.unpack_from("!H", raw, 2)[0]
            ip6 = ipaddress.IPv6Address(raw[8:24])
            mapped = ip6.ipv4_mapped
            return (mapped if mapped is not None else ip6), port
        raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
        port = struct.unpack_from("!H", raw, 2)[0]
        return ipaddress.IPv4Address(raw[4:8]), port
    except OSError as e:
        raise OriginalDestinationError(
            e.errno,
            "no original destination on this connection (SO_ORIGINAL_DST failed: was it "
            f"redirected by iptables REDIRECT to the outbound port?): {e.strerror}",
        ) from None


def _is_v4_mapped(host: str) -> bool:
    return host.startswith("::ffff:") and "." in host


class SoOriginalDst:
    def original_destination(self, sock: socket.socket) -> SocketAddr:
        return original_destination(sock)


def set_mark(sock: socket.socket, mark: int) -> None:
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
    except PermissionError as e:
        raise PermissionError(
            e.errno, "cannot set SO_MARK on a proxy socket: the daemon needs CAP_NET_ADMIN"
        ) from None


def set_keepalive(sock: socket.socket, config: Config) -> None:
    if not config.keepalive_enabled:
        return
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, max(1, int(config.keepalive_time_s)))
    sock.setsockopt(
        socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, max(1, int(config.keepalive_interval_s))
    )
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, config.keepalive_retries)


def bind_transparent(sock: socket.socket, source: IPAddress) -> None:
    """Bind to a foreign address (the original client's): IP_TRANSPARENT + IP_FREEBIND."""
    if source.version == 6:
        sock.setsockopt(socket.IPPROTO_IPV6, IPV6_TRANSPARENT, 1)
        sock.setsockopt(socket.IPPROTO_IPV6, IPV6_FREEBIND, 1)
    else:
        sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
        sock.setsockopt(socket.SOL_IP, IP_FREEBIND, 1)
    sock.bind((str(source), 0))


class PodSocketFactory:
    """Upstream sockets for one pod (``netns_fd=None``: the daemon's own namespace)."""

    def __init__(
        self,
        config: Config,
        netns_fd: int | None = None,
        *,
        mark: bool = True,
        spoofed: SpoofedSources | None = None,
    ) -> None:
        self._config = config
        self._netns_fd = netns_fd
        self._mark = config.packet_mark if mark else None
        self.spoofing = bool(config.enable_orig_src)
        self._spoofed = spoofed
        self._connecting: set[int] = set()  # fds of spoofed sockets told to ``spoofed``

    def upstream_socket(
        self, family: int, *, source: IPAddress | None = None, port: int = 0
    ) -> socket.socket:
        sock = socket_in_netns(self._netns_fd, family, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            if self._mark is not None:
                set_mark(sock, self._mark)
            set_keepalive(sock, self._config)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if source is not None and self.spoofing:
                if self._mark is not None:
                    set_mark(sock, self._mark | ORIG_SRC_MARK)  # replies routed back to us
                bind_transparent(sock, source)
                if self._spoofed is not None:
                    self._spoofed.connecting(sock)
                    self._connecting.add(sock.fileno())
            elif port:
                # Sockets that connect to other destinations may share the port.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", port))
        except BaseException:
            sock.close()
            raise
        return sock

    def connected(self, sock: socket.socket) -> None:
        if self._spoofed is not None and sock.fileno() in self._connecting:
            self._connecting.discard(sock.fileno())
            self._spoofed.connected(sock)
