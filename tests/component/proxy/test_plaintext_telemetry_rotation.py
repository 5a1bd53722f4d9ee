"""Inbound plaintext (:15006), the telemetry seam, and certificate rotation on :15008."""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import replace

import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from ztunnel_py.identity.certificate import WorkloadCertificate
from ztunnel_py.identity.tls import NO_SNI, client_context
from ztunnel_py.proxy.inbound_plain import InboundPlaintextServer
from ztunnel_py.proxy.inputs import PodInputs
from ztunnel_py.proxy.sockopt import PodSocketFactory
from ztunnel_py.rbac.evaluate import ConnectionInfo, Decision
from ztunnel_py.telemetry.connections import ConnectionRecord, Direction, NoTelemetry, Progress
from ztunnel_py.telemetry.metrics import ResponseFlags
from ztunnel_py.testing.proxy_harness import (
    CLIENT_ID,
    SERVER_ID,
    FixedDestination,
    Mesh,
    connect_request,
    echo_app,
    listen,
    make_config,
    pattern,
    raw_hbone,
    start_mesh,
)


class Recorder(NoTelemetry):
    def __init__(self) -> None:
        self.opened: list[ConnectionRecord] = []
        self.closed: list[tuple[ConnectionRecord, int, int, str | None]] = []

    def connection_opened(self, record: ConnectionRecord, progress: Progress | None = None) -> None:
        self.opened.append(record)

    def connection_closed(
        self,
        record: ConnectionRecord,
        *,
        bytes_sent: int,
        bytes_received: int,
        error: str | None,
        flags: ResponseFlags | None = None,
    ) -> None:
        self.closed.append((record, bytes_sent, bytes_received, error))


class OnlyFrom:
    def __init__(self, allowed_port: int) -> None:
        self.allowed_port = allowed_port
        self.seen: list[ConnectionInfo] = []

    def check(self, conn: ConnectionInfo) -> Decision:
        self.seen.append(conn)
        return Decision(conn.dst_port == self.allowed_port, None, "test policy")


@pytest.mark.asyncio
async def test_inbound_plaintext_allows_and_denies_without_identity() -> None:
    mesh = await start_mesh()
    try:
        port = await mesh.serve_app(echo_app)
        authorizer = OnlyFrom(port)
        recorder = Recorder()
        for target, expect_ok in (((mesh.server_ip, port), True), ((mesh.server_ip, 1), False)):
            server = InboundPlaintextServer(
                replace(
                    mesh.inputs,
                    # the app, as TPROXY keeps it
                    inbound_original_destination=FixedDestination(target),
                    telemetry=recorder,
                ),
                PodInputs(
                    workload=mesh.server,
                    sockets=PodSocketFactory(make_config(), mark=False),
                    pool=mesh.pool,
                    authorizer=authorizer,
                ),
            )
            sock = listen(mesh.server_ip, 0)
            await server.start(sock)
            reader, writer = await asyncio.open_connection(*sock.getsockname()[:2])
            writer.write(b"plain")
            if expect_ok:
                assert await reader.readexactly(5) == b"plain"
                writer.write_eof()
                assert await reader.read() == b""
            else:
                with pytest.raises(ConnectionResetError):
                    await reader.read()
            writer.close()
            await server.stop(1.0)
        assert [c.src_identity for c in authorizer.seen] == [None, None]
        assert len(recorder.opened) == 1 and recorder.opened[0].protocol == "TCP"
        assert recorder.closed[0][1:] == (5, 5, None)
    finally:
        await mesh.stop()


@pytest.mark.asyncio
async def test_telemetry_sees_both_ends_with_byte_counts() -> None:
    recorder = Recorder()
    mesh = await start_mesh(telemetry=recorder)
    try:
        port = await mesh.serve_app(echo_app)
        reader, writer = await mesh.dial(port)
        data = pattern(300_000, 1)
        writer.write(data)
        writer.write_eof()
        assert await reader.read() == data
        writer.close()
        for _ in range(200):
            if len(recorder.closed) == 2:
                break
            await asyncio.sleep(0.01)
        by_dir = {
            r.direction: (r, sent, received, err) for r, sent, received, err in recorder.closed
        }
        out, out_sent, out_received, out_err = by_dir[Direction.OUTBOUND]
        inb, in_sent, in_received, in_err = by_dir[Direction.INBOUND]
        assert (out_sent, out_received, out_err) == (300_000, 300_000, None)
        assert (in_sent, in_received, in_err) == (300_000, 300_000, None)
        assert out.src_identity == str(CLIENT_ID) and out.dst_identity == str(SERVER_ID)
        assert inb.src_identity == str(CLIENT_ID) and inb.dst == (mesh.server_ip, port)
    finally:
        await mesh.stop()


@pytest.mark.asyncio
async def test_rotated_certificate_is_served_to_new_connections() -> None:
    mesh = await start_mesh(certificate_refresh_s=0.0)
    try:
        port = await mesh.serve_app(echo_app)
        first = await _server_cert_der(mesh)
        # Rotate: the certificate source now hands out a new leaf for the same identity.
        issued = mesh.pki.ca.issue_workload(str(SERVER_ID))
        mesh.pki._certs[SERVER_ID] = WorkloadCertificate.from_ca_response(
            SERVER_ID, issued.key_pem, [issued.cert_pem.decode(), mesh.pki.ca.root_pem.decode()]
        )
        await _server_cert_der(mesh)  # this connection makes the server fetch the new one
        await asyncio.sleep(0.05)
        rotated = await _server_cert_der(mesh)
        assert rotated != first
        assert rotated == mesh.pki.cert(SERVER_ID).leaf.public_bytes(Encoding.DER)
        # Tunnels keep working on the rotated certificate.
        (answer,) = await raw_hbone(mesh, [connect_request(f"{mesh.server_ip}:{port}")])
        assert answer.status == 200
    finally:
        await mesh.stop()


async def _server_cert_der(mesh: Mesh) -> bytes:
    ctx = client_context(mesh.pki.cert(CLIENT_ID))
    _reader, writer = await asyncio.open_connection(
        str(mesh.server_ip), 15008, ssl=ctx, server_hostname=NO_SNI
    )
    sslobj = writer.get_extra_info("ssl_object")
    assert isinstance(sslobj, ssl.SSLObject)
    der = sslobj.getpeercert(binary_form=True)
    writer.close()
    assert der is not None
    return der


@pytest.mark.asyncio
async def test_policy_change_closes_a_live_tunnel() -> None:
    from ztunnel_py.proxy.conntrack import POLICY_CHANGE_ERROR, ConnectionTracker

    conntrack = ConnectionTracker()
    recorder = Recorder()
    mesh = await start_mesh(conntrack=conntrack, telemetry=recorder)
    try:
        port = await mesh.serve_app(echo_app)
        reader, writer = await mesh.dial(port)
        writer.write(b"before")
        assert await reader.readexactly(6) == b"before"
        (handle,) = list(conntrack)
        assert handle.conn.src_identity == str(CLIENT_ID) and handle.conn.dst_port == port
        handle.close(POLICY_CHANGE_ERROR)  # what on_policy_change does for a denied connection
        with pytest.raises(ConnectionResetError):
            await reader.read()
        writer.close()
        for _ in range(200):
            if len(conntrack) == 0 and len(recorder.closed) == 2:
                break
            await asyncio.sleep(0.01)
        assert len(conntrack) == 0
        inbound = [c for c in recorder.closed if c[0].direction is Direction.INBOUND]
        assert inbound[0][3] == POLICY_CHANGE_ERROR
    finally:
        await mesh.stop()
