"""Original destinations in eBPF mode while istio-cni's in-pod iptables rules are installed.

A stock istio-cni installs its nat REDIRECT rules in every ambient pod whatever the node proxy
does. In eBPF mode they do not fight the kernel programs, but they catch what those leave
alone:

- outbound: ``connect4/6`` rewrites mesh connections to 127.0.0.1:15001 (``::1``) at
  ``connect()``, before netfilter sees a packet, and istio-cni's rule skips destination
  127.0.0.1, so those connections are redirected once, by BPF, with their destination in the
  BPF map. Connections the programs leave alone (non-mesh egress, sockets outside the pods'
  cgroup) are still REDIRECTed to :15001 by iptables: their destination is in conntrack.
- inbound plaintext: nat PREROUTING runs before the socket lookup, so REDIRECT rewrites the
  destination to <pod>:15006 before ``sk_lookup`` sees it (and that program leaves the proxy's
  own ports alone). The accepted socket's own address is then :15006, not where the
  connection was going: conntrack has that too.
"""

from __future__ import annotations

import errno
import socket

from ztunnel_py.proxy.sockets import OriginalDestination
from ztunnel_py.proxy.sockopt import OriginalDestinationError, SocketAddr, SoOriginalDst
from ztunnel_py.proxy.tcp import sockaddr


class KernelMapThenConntrack:
    """Outbound: the BPF map's entry, else ``SO_ORIGINAL_DST`` (an iptables REDIRECT)."""

    def __init__(
        self, kernel_map: OriginalDestination, conntrack: OriginalDestination | None = None
    ) -> None:
        self._map = kernel_map
        self._conntrack = conntrack or SoOriginalDst()

    def original_destination(self, sock: socket.socket) -> SocketAddr:
        try:
            return self._map.original_destination(sock)
        except OSError as not_in_map:
            try:
                dst = self._conntrack.original_destination(sock)
            except OSError:
                raise not_in_map from None  # neither redirected it: the map's error says why
        if dst == sockaddr(sock.getsockname()):
            # Conntrack knows the connection but it was not NATed: someone dialled :15001.
            raise OriginalDestinationError(
                errno.ENOENT,
                "connection to the outbound port was redirected neither by the BPF connect hook"
                " nor by an iptables REDIRECT (a direct call to :15001)",
            )
        return dst


class LocalAddressUnlessRedirected:
    """Inbound plaintext: the accepted socket's own address (``sk_lookup`` keeps it), except
    when that is the listener's port, i.e. iptables REDIRECTed it: then ``SO_ORIGINAL_DST``."""

    def __init__(self, listener_port: int, conntrack: OriginalDestination | None = None) -> None:
        self._port = listener_port
        self._conntrack = conntrack or SoOriginalDst()

    def original_destination(self, sock: socket.socket) -> SocketAddr:
        local = sockaddr(sock.getsockname())
        if local[1] != self._port:
            return local
        try:
            return self._conntrack.original_destination(sock)
        except OSError:
            return local  # dialled :15006 itself; the server refuses its own port
