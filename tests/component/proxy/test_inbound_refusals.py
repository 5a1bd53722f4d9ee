"""What the inbound HBONE server refuses, with which status, and that it keeps serving."""

from __future__ import annotations

import asyncio
import ipaddress
import ssl
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from ztunnel_py.hbone.connection import HboneSettings
from ztunnel_py.identity.spiffe import Identity
from ztunnel_py.identity.tls import NO_SNI
from ztunnel_py.rbac.evaluate import ConnectionInfo, Decision
from ztunnel_py.state.model import GatewayAddress, NetworkAddress, Service
from ztunnel_py.state.store import UpdateBatch
from ztunnel_py.testing.proxy_harness import (
    CLIENT_ID,
    Mesh,
    connect_request,
    echo_app,
    pod,
    raw_hbone,
    start_mesh,
)


class DenyPort:
    def __init__(self, port: int) -> None:
        self.port = port
        self.seen: list[ConnectionInfo] = []

    def check(self, conn: ConnectionInfo) -> Decision:
        self.seen.append(conn)
        if conn.dst_port == self.port:
            return Decision(False, "default/deny", "denied by policy default/deny")
        return Decision(True, None, "allowed")


@pytest_asyncio.fixture
async def mesh() -> AsyncIterator[Mesh]:
    m = await start_mesh(
        authorizer=DenyPort(9999),
        server_settings=HboneSettings(max_header_list_size=64 * 1024, max_concurrent_streams=5),
        handshake_timeout_s=0.5,
    )
    yield m
    await m.stop()


async def assert_still_serving(mesh: Mesh) -> None:
    port = await mesh.serve_app(echo_app)
    reader, writer = await mesh.dial(port)
    writer.write(b"still alive")
    assert await reader.readexactly(11) == b"still alive"
    writer.close()


@pytest.mark.asyncio
async def test_statuses_for_bad_requests(mesh: Mesh) -> None:
    port = await mesh.serve_app(echo_app)
    ip = mesh.server_ip
    cases = {
        "non-CONNECT method": (
            [
                (":method", "GET"),
                (":scheme", "https"),
                (":path", "/"),
                (":authority", f"{ip}:{port}"),
            ],
            400,
        ),
        "malformed authority": (connect_request("not an authority"), 400),
        "foreign IP": (connect_request(f"{mesh.base}.77:{port}"), 400),
        "proxy's own port": (connect_request(f"{ip}:15006"), 400),
        "unknown service host": (connect_request(f"nope.default.svc.cluster.local:{port}"), 400),
        "bad forwarded header": ([*connect_request(f"{ip}:{port}"), ("forwarded", "garbage")], 400),
        "malformed traceparent is ignored": (
            [*connect_request(f"{ip}:{port}"), ("traceparent", "00-nope-01")],
            200,
        ),
        "denied by policy": (connect_request(f"{ip}:9999"), 401),
        "nothing listening": (connect_request(f"{ip}:1"), 503),
        "allowed": (connect_request(f"{ip}:{port}"), 200),
    }
    requests = [req for req, _ in cases.values()]
    answers = []
    for i in range(0, len(requests), 4):  # the server allows 5 concurrent streams
        answers += await raw_hbone(mesh, requests[i : i + 4])
    got = {name: a.status for name, a in zip(cases, answers, strict=True)}
    assert got == {name: status for name, (_, status) in cases.items()}
    authorizer = mesh.inbound.authorizer
    assert isinstance(authorizer, DenyPort)
    assert {c.src_identity for c in authorizer.seen} == {str(CLIENT_ID)}
    await assert_still_serving(mesh)


@pytest.mark.asyncio
async def test_service_hostname_authority_maps_to_target_port() -> None:
    svc = Service(
        name="echo",
        namespace="default",
        hostname="echo.default.svc.cluster.local",
        vips=(),
        ports={80: 0},
    )
    m = await start_mesh(services=(svc,), server_services={svc.key: {}})
    try:
        port = await m.serve_app(echo_app)
        # The pod serves service port 80 on its app port (workload-level mapping).
        m.state.apply(
            __import__("ztunnel_py.state.store", fromlist=["UpdateBatch"]).UpdateBatch(
                workloads=(
                    __import__("dataclasses").replace(m.server, services={svc.key: {80: port}}),
                )
            )
        )
        answers = await raw_hbone(
            m,
            [
                connect_request("echo.default.svc.cluster.local:80"),
                connect_request("echo.default.svc.cluster.local:81"),
            ],
        )
        assert [a.status for a in answers] == [200, 503]
    finally:
        await m.stop()


@pytest.mark.asyncio
async def test_waypoint_sandwich_serves_targets_that_name_this_pod_as_waypoint(
    mesh: Mesh,
) -> None:
    port = await mesh.serve_app(echo_app)
    waypointed = pod(
        "behind",
        ipaddress.ip_address(f"{mesh.base}.9"),
        "behind",
        waypoint=GatewayAddress(destination=NetworkAddress("", mesh.server_ip)),
    )
    plain = pod("plain", ipaddress.ip_address(f"{mesh.base}.10"), "plain")
    mesh.state.apply(UpdateBatch(workloads=(waypointed, plain)))
    answers = await raw_hbone(
        mesh,
        [
            connect_request(f"{mesh.base}.9:{port}"),  # this pod is its waypoint: served here
            connect_request(f"{mesh.base}.10:{port}"),  # no waypoint: not ours
            connect_request(f"{mesh.base}.9:9999"),  # still authorized as this pod's port
        ],
    )
    assert [a.status for a in answers] == [200, 400, 401]
    authorizer = mesh.inbound.authorizer
    assert isinstance(authorizer, DenyPort)
    assert {c.dst_ip for c in authorizer.seen} == {mesh.server_ip}
    await assert_still_serving(mesh)


@pytest.mark.asyncio
async def test_waypoint_sandwich_target_unknown_to_the_state_is_fetched_on_demand(
    mesh: Mesh,
) -> None:
    port = await mesh.serve_app(echo_app)
    behind = pod(
        "late",
        ipaddress.ip_address(f"{mesh.base}.11"),
        "late",
        waypoint=GatewayAddress(destination=NetworkAddress("", mesh.server_ip)),
    )
    asked: list[str] = []

    async def demand(key: str) -> None:  # istiod answers with the workload (or not at all)
        asked.append(key)
        if key == f"/{behind.workload_ips[0]}":
            mesh.state.apply(UpdateBatch(workloads=(behind,)))

    mesh.inbound.demand = demand
    answers = await raw_hbone(
        mesh,
        [
            connect_request(f"{mesh.base}.11:{port}"),  # fetched, names this pod as waypoint
            connect_request(f"{mesh.base}.12:{port}"),  # istiod does not know it either
        ],
    )
    assert [a.status for a in answers] == [200, 400]
    assert sorted(asked) == [f"/{mesh.base}.11", f"/{mesh.base}.12"]
    # Known now: no second lookup.
    (again,) = await raw_hbone(mesh, [connect_request(f"{mesh.base}.11:{port}")])
    assert again.status == 200 and len(asked) == 2
    await assert_still_serving(mesh)


@pytest.mark.asyncio
async def test_oversized_headers_drop_the_connection(mesh: Mesh) -> None:
    (answer,) = await raw_hbone(
        mesh, [[*connect_request(f"{mesh.server_ip}:80"), ("x-big", "y" * 70000)]]
    )
    assert answer.status is None and answer.terminated
    await assert_still_serving(mesh)


@pytest.mark.asyncio
async def test_stream_flood_past_the_limit_is_refused(mesh: Mesh) -> None:
    port = await mesh.serve_app(echo_app)
    # The server allows 5 concurrent streams; a client that ignores that loses the connection.
    answers = await raw_hbone(mesh, [connect_request(f"{mesh.server_ip}:{port}")] * 8)
    assert any(a.terminated for a in answers)
    assert sum(a.status == 200 for a in answers) <= 5
    await assert_still_serving(mesh)


@pytest.mark.asyncio
async def test_client_without_certificate_is_refused(mesh: Mesh) -> None:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(["h2"])
    with pytest.raises((ssl.SSLError, ConnectionError)):
        reader, writer = await asyncio.open_connection(
            str(mesh.server_ip), 15008, ssl=ctx, server_hostname=NO_SNI
        )
        # TLS 1.3: the refusal of a missing client certificate arrives with the first read.
        writer.write(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        data = await reader.read(100)
        writer.close()
        if not data:
            raise ConnectionResetError("closed")
    await assert_still_serving(mesh)


@pytest.mark.asyncio
async def test_client_from_another_trust_domain_is_refused(mesh: Mesh) -> None:
    stranger = Identity("other.domain", "default", "client")
    (answer,) = await raw_hbone(mesh, [connect_request(f"{mesh.server_ip}:80")], identity=stranger)
    assert answer.status is None and answer.terminated
    await assert_still_serving(mesh)


@pytest.mark.asyncio
async def test_tls_handshake_that_never_finishes_times_out(mesh: Mesh) -> None:
    reader, writer = await asyncio.open_connection(str(mesh.server_ip), 15008)
    writer.write(b"\x16\x03\x01")  # the start of a ClientHello, then silence
    # The server gives up after its handshake timeout (0.5 s here) and closes.
    assert await asyncio.wait_for(reader.read(), 5) == b""
    writer.close()
    await assert_still_serving(mesh)


@pytest.mark.asyncio
async def test_plain_http_garbage_on_the_hbone_port(mesh: Mesh) -> None:
    reader, writer = await asyncio.open_connection(str(mesh.server_ip), 15008)
    writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    data = await asyncio.wait_for(reader.read(), 5)
    assert b"200" not in data
    writer.close()
    await assert_still_serving(mesh)


@pytest.mark.asyncio
async def test_outbound_refuses_a_server_with_an_unexpected_identity() -> None:
    m = await start_mesh()
    try:
        port = await m.serve_app(echo_app)
        # The server pod's certificate says sa/server; make the route expect someone else.
        from dataclasses import replace

        from ztunnel_py.state.store import UpdateBatch

        m.state.apply(UpdateBatch(workloads=(replace(m.server, service_account="impostor"),)))
        m.inbound.workload = m.server  # the server keeps presenting sa/server
        reader, writer = await m.dial(port)
        with pytest.raises(ConnectionResetError):
            await reader.read()
        writer.close()
        assert m.pool.connections() == []
    finally:
        await m.stop()
