"""Original destinations in eBPF mode next to istio-cni's in-pod rules (``proxy/coexist.py``).

Real loopback sockets stand for the accepted connection (their own address is what the kernel
reports); the BPF map and conntrack are stand-ins that answer or raise as the kernel would.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
from collections.abc import Iterator

import pytest

from ztunnel_py.proxy.coexist import KernelMapThenConntrack, LocalAddressUnlessRedirected
from ztunnel_py.proxy.sockopt import OriginalDestinationError, SocketAddr

ELSEWHERE: SocketAddr = (ipaddress.ip_address("192.0.2.7"), 443)
MESH_DST: SocketAddr = (ipaddress.ip_address("10.96.0.1"), 80)


class Answers:
    """An ``OriginalDestination`` that returns ``dst`` or raises ``error``, counting calls."""

    def __init__(self, dst: SocketAddr | None = None, error: OSError | None = None) -> None:
        self.dst, self.error, self.calls = dst, error, 0

    def original_destination(self, sock: socket.socket) -> SocketAddr:
        self.calls += 1
        if self.error is not None:
            raise self.error
        assert self.dst is not None
        return self.dst


def not_found(what: str) -> OSError:
    return OSError(errno.ENOENT, f"{what}: no entry")


@pytest.fixture
def accepted() -> Iterator[socket.socket]:
    """The server side of a loopback connection."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        conn, _ = listener.accept()
        with client, conn:
            yield conn


def own_address(sock: socket.socket) -> SocketAddr:
    host, port = sock.getsockname()
    return ipaddress.ip_address(host), port


def test_outbound_prefers_the_bpf_map_and_leaves_conntrack_alone(accepted: socket.socket) -> None:
    kernel, conntrack = Answers(MESH_DST), Answers(ELSEWHERE)
    assert KernelMapThenConntrack(kernel, conntrack).original_destination(accepted) == MESH_DST
    assert conntrack.calls == 0


def test_outbound_falls_back_to_conntrack_when_the_map_has_no_entry(
    accepted: socket.socket,
) -> None:
    kernel, conntrack = Answers(error=not_found("bpf map")), Answers(ELSEWHERE)
    assert KernelMapThenConntrack(kernel, conntrack).original_destination(accepted) == ELSEWHERE
    assert (kernel.calls, conntrack.calls) == (1, 1)


def test_outbound_reports_the_maps_error_when_neither_knows(accepted: socket.socket) -> None:
    lookup = KernelMapThenConntrack(
        Answers(error=not_found("bpf map")), Answers(error=not_found("conntrack"))
    )
    with pytest.raises(OSError, match="bpf map"):
        lookup.original_destination(accepted)


def test_outbound_refuses_a_connection_that_dialled_the_proxy_port_itself(
    accepted: socket.socket,
) -> None:
    # Conntrack's original tuple of an un-NATed connection is the socket's own address.
    lookup = KernelMapThenConntrack(
        Answers(error=not_found("bpf map")), Answers(own_address(accepted))
    )
    with pytest.raises(OriginalDestinationError, match="direct call to :15001"):
        lookup.original_destination(accepted)


def test_inbound_keeps_the_local_address_that_sk_lookup_left(accepted: socket.socket) -> None:
    conntrack = Answers(ELSEWHERE)
    lookup = LocalAddressUnlessRedirected(listener_port=15006, conntrack=conntrack)
    assert lookup.original_destination(accepted) == own_address(accepted)
    assert conntrack.calls == 0


def test_inbound_on_the_listener_port_reads_conntrack(accepted: socket.socket) -> None:
    port = own_address(accepted)[1]  # as if iptables had REDIRECTed it to this listener
    lookup = LocalAddressUnlessRedirected(listener_port=port, conntrack=Answers(ELSEWHERE))
    assert lookup.original_destination(accepted) == ELSEWHERE


def test_inbound_on_the_listener_port_without_nat_stays_the_listener_port(
    accepted: socket.socket,
) -> None:
    port = own_address(accepted)[1]
    lookup = LocalAddressUnlessRedirected(
        listener_port=port, conntrack=Answers(error=not_found("conntrack"))
    )
    # The server then refuses it as a call to its own port.
    assert lookup.original_destination(accepted) == own_address(accepted)
