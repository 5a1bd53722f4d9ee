"""``connect_socket(source_ports=...)``: the HBONE source-port range, sharing ports across
destinations and moving on when a port is taken towards the same one."""

from __future__ import annotations

import ipaddress
import socket

import pytest

from ztunnel_py.proxy.errors import UpstreamConnectError
from ztunnel_py.proxy.sockopt import PodSocketFactory
from ztunnel_py.proxy.tcp import connect_socket
from ztunnel_py.testing.proxy_harness import make_config

ip = ipaddress.ip_address


@pytest.mark.asyncio
async def test_source_ports_come_from_the_range_until_it_is_used_up() -> None:
    server = socket.socket()  # the kernel completes the handshakes from its backlog
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    port = server.getsockname()[1]
    sockets = PodSocketFactory(make_config(), mark=False)
    ports = range(15150, 15153)  # three ports: three connections to one destination
    held: list[socket.socket] = []
    try:
        for _ in ports:
            sock = await connect_socket(sockets, (ip("127.0.0.1"), port), source_ports=ports)
            held.append(sock)
        assert sorted(s.getsockname()[1] for s in held) == list(ports)
        with pytest.raises(UpstreamConnectError, match="every source port 15150-15152"):
            await connect_socket(sockets, (ip("127.0.0.1"), port), source_ports=ports)
    finally:
        for s in held:
            s.close()
        server.close()
