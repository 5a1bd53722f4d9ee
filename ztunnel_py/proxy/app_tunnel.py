"""The application tunnel of an inbound connection: where it goes and the PROXY v2 header.

A workload whose ``application_tunnel`` asks for ``PROXY`` (a waypoint, typically) gets every
inbound HBONE stream on the tunnel's port, preceded by a PROXY protocol v2 header, as ztunnel
writes it (``proxy::write_proxy_protocol``; layout in HAProxy's proxy-protocol.txt, section
2.2):

- command ``PROXY``, transport ``STREAM``;
- source: the HBONE connection's peer (client IP and port); destination: the HBONE target,
  or for a service hostname the service's VIP on this network (IPv4 first) with the requested
  port, since PROXY cannot carry a name;
- a TLV of type ``0xD0`` holding the peer's SPIFFE id (UTF-8), when the peer has one.

With ``LOCALHOST_APP_TUNNEL`` (on by default, as in ztunnel) the tunnel is dialled from and to
loopback inside the pod, so the application's tunnel port need not be reachable from outside;
the real addresses travel in the header. Pure: no sockets, no I/O.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

from ztunnel_py.errors import ZtunnelError
from ztunnel_py.state.model import (
    AppTunnelProtocol,
    IPAddress,
    Service,
    SocketAddr,
    Workload,
)

PROXY_V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
PROXY_V2_VERSION_COMMAND = 0x21  # version 2, command PROXY
PROXY_V2_UNSPEC_STREAM = 0x01  # family AF_UNSPEC (no addresses), transport STREAM
PROXY_V2_INET_STREAM = 0x11
PROXY_V2_INET6_STREAM = 0x21
#: ztunnel's ``PROXY_PROTOCOL_AUTHORITY_TLV``: the client's SPIFFE id.
PROXY_TLV_PEER_IDENTITY = 0xD0
_MAX_LENGTH = 0xFFFF  # the header's and a TLV's 16-bit length fields


class AppTunnelError(ZtunnelError):
    """The tunnel cannot carry this request (e.g. a service without an address to name)."""


@dataclass(frozen=True, slots=True)
class TunnelRequest:
    """What the tunnel tells the application: the HBONE target, as an address."""

    protocol: AppTunnelProtocol
    target: SocketAddr


def tunnel_request(
    workload: Workload,
    *,
    target_ip: IPAddress | None,
    port: int,
    service: Service | None,
    network: str,
) -> TunnelRequest | None:
    """The tunnel request for a stream to ``workload`` (None: it has no app tunnel).

    ``target_ip`` is the CONNECT authority's IP, or None when the authority named
    ``service`` by hostname; ``port`` is the authority's port.
    """
    tunnel = workload.application_tunnel
    if tunnel is None:
        return None
    if target_ip is not None:
        return TunnelRequest(tunnel.protocol, (target_ip, port))
    if service is None or not service.vips:
        name = service.hostname if service is not None else "the requested service"
        raise AppTunnelError(
            f"{name} has no VIP to name in the application tunnel's PROXY header"
            " (PROXY carries addresses, not hostnames)"
        )
    # ztunnel's preference: this network first, and on it IPv4 before IPv6.
    vip = max(
        service.vips,
        key=lambda a: (2 if a.address.version == 4 else 1) if a.network == network else 0,
    )
    return TunnelRequest(tunnel.protocol, (vip.address, port))


def upstream_route(
    upstream: SocketAddr,
    tunnel: TunnelRequest | None,
    *,
    peer_ip: IPAddress,
    orig_src: bool,
    localhost_app_tunnel: bool,
) -> tuple[IPAddress | None, SocketAddr]:
    """(source to bind or None, address to dial) for the connection to the application.

    A PROXY tunnel with ``LOCALHOST_APP_TUNNEL`` goes loopback to loopback (the family of the
    upstream). Otherwise the client's IP is the source when original source is on, unless it
    is the upstream's own IP (a pod calling itself connects directly, as in ztunnel).
    """
    ip, port = upstream
    if localhost_app_tunnel and tunnel is not None and tunnel.protocol is AppTunnelProtocol.PROXY:
        loopback: IPAddress = (
            ipaddress.IPv4Address("127.0.0.1") if ip.version == 4 else ipaddress.IPv6Address("::1")
        )
        return None, (loopback, port)
    if orig_src and peer_ip != ip:
        return peer_ip, upstream
    return None, upstream


def proxy_v2_header(source: SocketAddr, destination: SocketAddr, identity: str | None) -> bytes:
    """A PROXY protocol v2 header (command PROXY, STREAM) with the peer-identity TLV.

    Addresses of different families cannot share the address block: like ztunnel's ``ppp``
    builder, the header then says AF_UNSPEC and carries no addresses (the TLV still goes).
    """
    src_ip, src_port = source
    dst_ip, dst_port = destination
    if src_ip.version == dst_ip.version == 4:
        family = PROXY_V2_INET_STREAM
        addresses = src_ip.packed + dst_ip.packed + struct.pack("!HH", src_port, dst_port)
    elif src_ip.version == dst_ip.version == 6:
        family = PROXY_V2_INET6_STREAM
        addresses = src_ip.packed + dst_ip.packed + struct.pack("!HH", src_port, dst_port)
    else:
        family, addresses = PROXY_V2_UNSPEC_STREAM, b""
    tlvs = b""
    if identity is not None:
        value = identity.encode()
        tlvs = struct.pack("!BH", PROXY_TLV_PEER_IDENTITY, len(value) & _MAX_LENGTH) + value
    body = addresses + tlvs
    if len(body) > _MAX_LENGTH:
        raise AppTunnelError(
            f"a peer identity of {len(tlvs) - 3} bytes does not fit a PROXY header"
        )
    return (
        PROXY_V2_SIGNATURE + struct.pack("!BBH", PROXY_V2_VERSION_COMMAND, family, len(body)) + body
    )
