"""Inbound HBONE to a pod whose application tunnel asks for PROXY: the app gets a PROXY v2
header (client address, HBONE target, client identity) and then the bytes; bad targets and
tunnel configs are refused with a status and the server keeps serving."""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio
from proxyprotocol.result import ProxyResult
from proxyprotocol.v2 import ProxyProtocolV2

from ztunnel_py.proxy.app_tunnel import PROXY_TLV_PEER_IDENTITY
from ztunnel_py.state.model import (
    ApplicationTunnel,
    AppTunnelProtocol,
    NetworkAddress,
    Service,
)
from ztunnel_py.state.store import UpdateBatch
from ztunnel_py.testing.proxy_harness import (
    CLIENT_ID,
    Mesh,
    connect_request,
    echo_app,
    raw_hbone,
    start_mesh,
)

SVC = Service(
    name="echo",
    namespace="default",
    hostname="echo.default.svc.cluster.local",
    vips=(NetworkAddress("", ipaddress.ip_address("10.96.7.7")),),
    ports={80: 0},
)
NO_VIP = dataclasses.replace(SVC, name="novip", hostname="novip.default.svc.cluster.local", vips=())


class ProxyApp:
    """An application behind a PROXY tunnel: reads the header, then echoes."""

    def __init__(self) -> None:
        self.headers: list[ProxyResult] = []
        self.dialled: list[str] = []  # the address each connection reached
        self.arrived = asyncio.Event()

    async def __call__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.dialled.append(writer.get_extra_info("sockname")[0])
        head = await reader.readexactly(16)
        rest = await reader.readexactly(int.from_bytes(head[14:16], "big"))
        self.headers.append(ProxyProtocolV2().unpack(head + rest))
        self.arrived.set()
        await echo_app(reader, writer)


@pytest_asyncio.fixture
async def mesh() -> AsyncIterator[Mesh]:
    m = await start_mesh(
        services=(SVC, NO_VIP), server_services={SVC.key: {80: 80}, NO_VIP.key: {80: 80}}
    )
    yield m
    await m.stop()


async def tunnel_to(mesh: Mesh, app: ProxyApp, *, localhost: bool, port: int = 0) -> int:
    """Serve ``app`` where the tunnel is dialled; give the server pod a PROXY tunnel to it."""
    host = "127.0.0.1" if localhost else str(mesh.server_ip)
    server = await asyncio.start_server(app, host, port)
    mesh.apps.append(server)
    tunnel_port = int(server.sockets[0].getsockname()[1])
    tunnelled = dataclasses.replace(
        mesh.server,
        application_tunnel=ApplicationTunnel(protocol=AppTunnelProtocol.PROXY, port=tunnel_port),
    )
    mesh.state.apply(UpdateBatch(workloads=(tunnelled,)))
    mesh.inbound.config = dataclasses.replace(mesh.config, localhost_app_tunnel=localhost)
    return tunnel_port


@pytest.mark.asyncio
@pytest.mark.parametrize("localhost", [True, False], ids=["localhost", "pod-ip"])
async def test_the_app_reads_who_called_which_target_then_the_bytes(
    mesh: Mesh, localhost: bool
) -> None:
    app = ProxyApp()
    await tunnel_to(mesh, app, localhost=localhost)
    reader, writer = await mesh.dial(9000)  # any target port: the tunnel port is dialled
    writer.write(b"hello through the tunnel")
    assert await reader.readexactly(24) == b"hello through the tunnel"
    (hbone,) = mesh.inbound._connections  # pooled: still open
    writer.close()
    (header,) = app.headers
    assert header.source == hbone.peer  # the HBONE client's address, not the proxy's
    assert header.dest == (mesh.server_ip, 9000)  # the HBONE target with its own port
    assert dict(header.tlv.items()) == {PROXY_TLV_PEER_IDENTITY: str(CLIENT_ID).encode()}
    assert app.dialled == ["127.0.0.1" if localhost else str(mesh.server_ip)]


@pytest.mark.asyncio
async def test_a_service_hostname_target_is_named_by_its_vip(mesh: Mesh) -> None:
    app = ProxyApp()
    await tunnel_to(mesh, app, localhost=True)
    answers = await raw_hbone(
        mesh,
        [
            connect_request("echo.default.svc.cluster.local:80"),
            connect_request("novip.default.svc.cluster.local:80"),  # nothing to name: 503
        ],
    )
    assert [a.status for a in answers] == [200, 503]
    async with asyncio.timeout(5):
        await app.arrived.wait()
    assert app.headers[0].dest == (ipaddress.ip_address("10.96.7.7"), 80)


@pytest.mark.asyncio
async def test_a_tunnel_on_the_proxys_own_port_is_refused_and_the_server_serves_on(
    mesh: Mesh,
) -> None:
    looping = dataclasses.replace(
        mesh.server,
        application_tunnel=ApplicationTunnel(protocol=AppTunnelProtocol.PROXY, port=15008),
    )
    mesh.state.apply(UpdateBatch(workloads=(looping,)))
    (answer,) = await raw_hbone(mesh, [connect_request(f"{mesh.server_ip}:9000")])
    assert answer.status == 400
    app = ProxyApp()
    await tunnel_to(mesh, app, localhost=True)  # fixed: the next stream goes through
    (answer,) = await raw_hbone(mesh, [connect_request(f"{mesh.server_ip}:9000")])
    assert answer.status == 200
