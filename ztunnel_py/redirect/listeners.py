"""A pod's three listening sockets, created inside the pod's network namespace.

:15001 (outbound), :15006 (inbound plaintext) and :15008 (inbound HBONE), each with ``SO_MARK``
(``PACKET_MARK``, 0x539) so the pod's redirection never captures them, ``SO_REUSEPORT``
(``INPOD_PORT_REUSE``) so an upgraded daemon can bind beside us, and ``IP_TRANSPARENT`` where
allowed. The workload manager takes a ``ListenerFactory``, so its logic runs without a netns.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import socket
from collections.abc import Callable
from dataclasses import dataclass

from ztunnel_py.config import (
    DEFAULT_PACKET_MARK,
    PORT_HBONE,
    PORT_INBOUND_PLAINTEXT,
    PORT_OUTBOUND,
    Config,
)
from ztunnel_py.errors import ZtunnelError
from ztunnel_py.netns import run_in_netns

LISTEN_BACKLOG = 1024
_IP_TRANSPARENT = 19
_IPV6_TRANSPARENT = 75


class EnrollmentError(ZtunnelError):
    """A pod's proxy could not start; the pod stays pending and is retried."""


@dataclass(frozen=True, slots=True)
class ListenerOptions:
    """How in-pod listeners are made (from ``Config`` in production)."""

    mark: int | None = DEFAULT_PACKET_MARK
    reuse_port: bool = True
    ipv6: bool = True
    transparent: bool = True
    outbound_port: int = PORT_OUTBOUND
    inbound_plaintext_port: int = PORT_INBOUND_PLAINTEXT
    inbound_hbone_port: int = PORT_HBONE
    backlog: int = LISTEN_BACKLOG

    @classmethod
    def from_config(cls, config: Config) -> ListenerOptions:
        return cls(
            mark=config.packet_mark,
            reuse_port=config.inpod_port_reuse,
            ipv6=config.ipv6_enabled,
        )


@dataclass(slots=True)
class PodListeners:
    """The pod's three listening sockets (non-blocking, already listening)."""

    outbound: socket.socket  # :15001
    inbound_plaintext: socket.socket  # :15006
    inbound_hbone: socket.socket  # :15008

    def sockets(self) -> tuple[socket.socket, socket.socket, socket.socket]:
        return (self.outbound, self.inbound_plaintext, self.inbound_hbone)

    def close(self) -> None:
        for s in self.sockets():
            s.close()


def create_pod_listeners(netns_fd: int | None, options: ListenerOptions) -> PodListeners:
    """Create, configure, bind and listen the three sockets in ``netns_fd`` (``None``: here)."""
    ports = (options.outbound_port, options.inbound_plaintext_port, options.inbound_hbone_port)
    family = socket.AF_INET6 if options.ipv6 else socket.AF_INET

    def make(fam: int) -> list[socket.socket]:
        made: list[socket.socket] = []
        try:
            for _ in ports:
                made.append(socket.socket(fam, socket.SOCK_STREAM | socket.SOCK_CLOEXEC))  # noqa: PERF401 (close the made ones on error)
        except BaseException:
            for s in made:
                s.close()
            raise
        return made

    def make_in_pod(fam: int) -> list[socket.socket]:
        return make(fam) if netns_fd is None else run_in_netns(netns_fd, lambda: make(fam))

    try:
        socks = make_in_pod(family)
    except OSError as e:
        if family != socket.AF_INET6 or e.errno != errno.EAFNOSUPPORT:
            raise
        family = socket.AF_INET
        socks = make_in_pod(family)
    try:
        for sock, port in zip(socks, ports, strict=True):
            _configure_and_bind(sock, family, port, options)
    except OSError as e:
        for s in socks:
            s.close()
        if family == socket.AF_INET6 and e.errno == errno.EADDRNOTAVAIL:
            # IPv6 is off inside this pod: fall back to IPv4 only.
            return create_pod_listeners(netns_fd, dataclasses.replace(options, ipv6=False))
        raise
    return PodListeners(*socks)


def _configure_and_bind(
    sock: socket.socket, family: int, port: int, options: ListenerOptions
) -> None:
    if options.mark is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, options.mark)
        except PermissionError as e:
            raise EnrollmentError(
                "cannot set SO_MARK on pod listeners: the daemon needs CAP_NET_ADMIN"
            ) from e
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if options.reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    if options.transparent:
        _try_transparent(sock, family)
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(("::", port))
    else:
        sock.bind(("0.0.0.0", port))
    sock.listen(options.backlog)
    sock.setblocking(False)


def _try_transparent(sock: socket.socket, family: int) -> None:
    """IP_TRANSPARENT lets a listener take TPROXY'd connections; without CAP_NET_ADMIN, skip."""
    opts = [(socket.SOL_IP, _IP_TRANSPARENT)]
    if family == socket.AF_INET6:
        opts.append((socket.IPPROTO_IPV6, _IPV6_TRANSPARENT))
    for level, name in opts:
        with contextlib.suppress(PermissionError, OSError):
            sock.setsockopt(level, name, 1)


ListenerFactory = Callable[[int | None, ListenerOptions], PodListeners]
