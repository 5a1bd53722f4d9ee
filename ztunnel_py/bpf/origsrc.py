"""The proxy's own spoofed-source connections, told to sk_lookup while they connect (eBPF mode).

With ``ENABLE_ORIG_SRC`` the inbound proxy dials the application from the client's address.
That SYN enters the pod like a client's, and the pod's sk_lookup program would hand it back to
the proxy's :15006. Between bind and connect the proxy lists the socket's bound
``{netns cookie, address, port}`` in ``zt_orig_src`` (sk_lookup lets those pass) and removes it
once the connect is over: sk_lookup only ever sees a connection's SYN. Two bpf(2) calls per
such connection.
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket

from ztunnel_py.bpf import _types as t
from ztunnel_py.bpf.errors import KeyNotFound
from ztunnel_py.bpf.maps import MapOps
from ztunnel_py.bpf.projection import addr16, be16, fill
from ztunnel_py.netns import netns_cookie

_PRESENT = bytes(t.ZtOrigSrc())


def orig_src_key(sock: socket.socket) -> bytes:
    """The key of a bound socket: its netns cookie, bound address and port."""
    host, port = sock.getsockname()[:2]
    key = t.ZtOrigSrcKey(netns_cookie=netns_cookie(sock), port=be16(int(port)))
    ip = ipaddress.ip_address(str(host).split("%", 1)[0])
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    fill(key.addr, addr16(ip))
    return bytes(key)


class BpfSpoofedSources:
    """``SpoofedSources`` of eBPF mode, over the pinned ``zt_orig_src`` map."""

    def __init__(self, orig_src_map: MapOps) -> None:
        self._map = orig_src_map

    def connecting(self, sock: socket.socket) -> None:
        self._map.update(orig_src_key(sock), _PRESENT)

    def connected(self, sock: socket.socket) -> None:
        with contextlib.suppress(KeyNotFound, OSError):
            self._map.delete(orig_src_key(sock))
