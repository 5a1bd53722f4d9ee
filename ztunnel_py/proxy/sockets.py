"""Where the proxy servers' sockets come from and where redirected connections were going.

Implementations: ``proxy.sockopt`` (netns sockets, ``SO_ORIGINAL_DST``), ``bpf.origdst``
(the eBPF ``orig_dst`` map), ``proxy.inbound_plain.LocalAddress`` (sk_lookup, TPROXY).
"""

from __future__ import annotations

import socket
from typing import Protocol

from ztunnel_py.state.model import IPAddress, SocketAddr


class OriginalDestination(Protocol):
    """Where an accepted outbound connection was going before it was redirected to :15001."""

    def original_destination(self, sock: socket.socket) -> SocketAddr: ...


class SocketFactory(Protocol):
    """Upstream sockets, made in the pod's netns with the daemon's mark and keepalives."""

    def upstream_socket(
        self, family: int, *, source: IPAddress | None = None, port: int = 0
    ) -> socket.socket:
        """A non-blocking TCP socket; with ``source``, bound to it (original-source spoofing);
        with ``port``, bound to that source port (``OSError`` EADDRINUSE when taken)."""
        ...

    def connected(self, sock: socket.socket) -> None:
        """The socket's connect is over (done or failed): release what its source held."""
        ...


class SpoofedSources(Protocol):
    """Where the redirection learns of the proxy's own original-source connections while they
    connect, so it does not capture them (eBPF mode: ``bpf.origsrc``)."""

    def connecting(self, sock: socket.socket) -> None: ...

    def connected(self, sock: socket.socket) -> None: ...
