"""The original destination of a connection accepted on a pod's :15001 (eBPF mode).

sock_ops published ``{netns cookie, source port, family} -> dialled address`` when the
application connected; the proxy's peer port is that source port and its accepted socket lives
in the same netns, so ``SO_NETNS_COOKIE`` on it gives the cookie. The family is the one on the
wire: an IPv6 application socket dialling an IPv4-mapped address makes an IPv4 connection.
One lookup (one bpf(2) call) per accepted connection.

The key names no socket, only a port: anyone who reaches the pod's :15001 from a port equal to
a live redirected connection's would get that connection's destination, tunnelled with the
pod's identity. connect4/6 always rewrite to the pod's loopback, so an entry is only ever
honoured for a connection between loopback addresses. A packet from outside the pod cannot
carry a loopback address (the kernel drops it as a martian), so only the pod's own sockets
pass.
"""

from __future__ import annotations

import ipaddress
import socket

from ztunnel_py.bpf import _types as t
from ztunnel_py.bpf.errors import KeyNotFound, NotRedirected, OriginalDestinationNotFound
from ztunnel_py.bpf.maps import MapOps
from ztunnel_py.bpf.projection import be16, from_addr16, from_be16
from ztunnel_py.netns import netns_cookie
from ztunnel_py.state.model import IPAddress

SocketAddr = tuple[IPAddress, int]


def orig_key(netns_cookie: int, peer_port: int, family: int) -> bytes:
    """``family`` is ``socket.AF_INET`` or ``AF_INET6`` (the kernel's values)."""
    return bytes(t.ZtOrigKey(netns_cookie=netns_cookie, port=be16(peer_port), family=family))


def lookup_original_destination(
    orig_map: MapOps, *, netns_cookie: int, peer_port: int, family: int
) -> SocketAddr:
    """The dialled address; ``OriginalDestinationNotFound`` when none was recorded."""
    try:
        raw = orig_map.lookup(orig_key(netns_cookie, peer_port, family))
    except KeyNotFound:
        raise OriginalDestinationNotFound(netns_cookie, peer_port, family) from None
    value = t.ZtOrig.from_buffer_copy(raw)
    return from_addr16(bytes(value.addr)), from_be16(value.port)


def wire_family(peer_ip: str) -> int:
    """AF_INET for IPv4 and IPv4-mapped peers, AF_INET6 otherwise."""
    ip = ipaddress.ip_address(peer_ip.split("%", 1)[0])
    if ip.version == 6 and ip.ipv4_mapped is None:
        return socket.AF_INET6
    return socket.AF_INET


def is_loopback(addr: str) -> bool:
    """127.0.0.0/8, ::1 and IPv4-mapped loopback (a dual-stack listener's view of 127.0.0.1)."""
    ip = ipaddress.ip_address(addr.split("%", 1)[0])
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


class BpfOriginalDestination:
    """The proxy's ``OriginalDestination`` in eBPF mode (``original_destination(sock)``)."""

    def __init__(self, orig_map: MapOps) -> None:
        self._map = orig_map

    def original_destination(self, sock: socket.socket) -> SocketAddr:
        peer = sock.getpeername()
        local = sock.getsockname()
        if not (is_loopback(str(peer[0])) and is_loopback(str(local[0]))):
            raise NotRedirected(str(peer[0]), int(peer[1]), str(local[0]))
        return lookup_original_destination(
            self._map,
            netns_cookie=netns_cookie(sock),
            peer_port=int(peer[1]),
            family=wire_family(str(peer[0])),
        )
