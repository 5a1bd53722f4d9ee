"""``CRL_PATH`` through a real tunnel: client pod -> outbound -> mTLS HBONE -> inbound -> app.

A revoked client is refused by the server's inbound (reporter ``destination``), a revoked server
by the client's outbound (reporter ``source``); a CRL written while a connection lives closes
it (``CERT_REVOKED`` in the connection metrics); a bad CRL keeps the last good one in force.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from ztunnel_py.identity.spiffe import Identity
from ztunnel_py.proxy.revocation import CrlManager, CrlMetrics
from ztunnel_py.state.store import ProxyState
from ztunnel_py.telemetry.metrics import ConnectionMetrics
from ztunnel_py.telemetry.sink import ProxyTelemetry
from ztunnel_py.testing.proxy_harness import (
    CLIENT_ID,
    SERVER_ID,
    Mesh,
    echo_app,
    start_mesh,
)

pytestmark = pytest.mark.asyncio


class Crl:
    def __init__(self, path: Path) -> None:
        self.registry = CollectorRegistry()
        self.manager = CrlManager(path, CrlMetrics(self.registry))
        self.path = path

    def value(self, name: str, **labels: str) -> float:
        v = self.registry.get_sample_value(name, labels)
        return 0.0 if v is None else v

    def rejections(self, reporter: str) -> float:
        return self.value("istio_crl_policy_rejections_total", reporter=reporter)


@contextlib.asynccontextmanager
async def mesh_with_crl(
    tmp_path: Path, telemetry: ProxyTelemetry | None = None, state: ProxyState | None = None
) -> AsyncIterator[tuple[Mesh, Crl]]:
    crl = Crl(tmp_path / "ca-crl.pem")
    mesh = await start_mesh(revocation=crl.manager, telemetry=telemetry, state=state)
    try:
        yield mesh, crl
    finally:
        await mesh.stop()


async def roundtrip(mesh: Mesh, port: int, payload: bytes = b"hello") -> bytes:
    reader, writer = await mesh.dial(port)
    try:
        writer.write(payload)
        await writer.drain()
        return await asyncio.wait_for(reader.readexactly(len(payload)), 10)
    finally:
        writer.close()


@pytest.mark.parametrize(
    ("revoked", "refused_by", "other"),
    [(CLIENT_ID, "destination", "source"), (SERVER_ID, "source", "destination")],
    ids=["client-refused-by-inbound", "server-refused-by-outbound"],
)
async def test_revoked_peer_is_refused_at_the_handshake(
    tmp_path: Path, revoked: Identity, refused_by: str, other: str
) -> None:
    async with mesh_with_crl(tmp_path) as (mesh, crl):
        crl.path.write_bytes(mesh.pki.ca.crl([mesh.pki.cert(revoked).leaf]))
        crl.manager.start()
        port = await mesh.serve_app(echo_app)
        with pytest.raises((asyncio.IncompleteReadError, ConnectionError)):
            await roundtrip(mesh, port)
        assert crl.rejections(refused_by) == 1
        assert crl.rejections(other) == 0
        assert mesh.inbound.connections == 0
        assert crl.manager.tracked == 0


async def test_unrelated_revocations_let_connections_through(tmp_path: Path) -> None:
    async with mesh_with_crl(tmp_path) as (mesh, crl):
        other = mesh.pki.ca.issue_workload("spiffe://cluster.local/ns/x/sa/y").cert
        crl.path.write_bytes(mesh.pki.ca.crl([other]))
        crl.manager.start()
        port = await mesh.serve_app(echo_app)
        assert await roundtrip(mesh, port) == b"hello"
        assert crl.rejections("destination") == crl.rejections("source") == 0


async def test_crl_update_closes_a_live_connection_of_the_revoked_peer(tmp_path: Path) -> None:
    state = ProxyState()
    registry = CollectorRegistry()
    telemetry = ProxyTelemetry(ConnectionMetrics(registry), state)
    async with mesh_with_crl(tmp_path, telemetry=telemetry, state=state) as (mesh, crl):
        crl.path.write_bytes(mesh.pki.ca.crl([]))
        crl.manager.start()
        watch = asyncio.create_task(crl.manager.watch(interval_s=0.02))
        try:
            port = await mesh.serve_app(echo_app)
            reader, writer = await mesh.dial(port)
            writer.write(b"before")
            assert await asyncio.wait_for(reader.readexactly(6), 10) == b"before"
            # one inbound (client's chain) and one outbound (server's chain) tracked
            assert crl.manager.tracked == 2

            crl.path.write_bytes(mesh.pki.ca.crl([mesh.pki.cert(CLIENT_ID).leaf]))
            rest = await asyncio.wait_for(reader.read(), 10)  # EOF or reset: closed by us
            assert rest == b""
            writer.close()
        except ConnectionResetError:
            pass
        finally:
            watch.cancel()
        assert crl.manager.revoked_connections == 1
        assert crl.manager.tracked == 0  # both ends of the tunnel are gone
        telemetry.flush()
        closed = registry.get_sample_value(
            "istio_tcp_connections_closed_total",
            {**_labels(registry, "destination"), "response_flags": "CERT_REVOKED"},
        )
        assert closed == 1
        # a new connection of the revoked client is refused at the handshake
        with pytest.raises((asyncio.IncompleteReadError, ConnectionError)):
            await roundtrip(mesh, port)
        assert crl.rejections("destination") == 1


def _labels(registry: CollectorRegistry, reporter: str) -> dict[str, str]:
    for family in registry.collect():
        for s in family.samples:
            if (
                s.name == "istio_tcp_connections_closed_total"
                and s.labels.get("reporter") == reporter
            ):
                labels = dict(s.labels)
                labels.pop("response_flags")
                return labels
    raise AssertionError(f"no closed connection reported by {reporter}")


async def test_bad_crl_update_keeps_the_last_good_one(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with mesh_with_crl(tmp_path) as (mesh, crl):
        crl.path.write_bytes(mesh.pki.ca.crl([mesh.pki.cert(CLIENT_ID).leaf]))
        crl.manager.start()
        crl.path.write_bytes(b"-----BEGIN X509 CRL-----\ngarbage\n-----END X509 CRL-----\n")
        with caplog.at_level(logging.ERROR):
            assert not await crl.manager.reload()
        assert f"CRL file {crl.path}: CRL 1 (PEM) cannot be parsed" in caplog.text
        assert "keeping the previous 1 CRL(s)" in caplog.text
        assert crl.manager.dump()["lastError"].startswith(f"CRL file {crl.path}")
        port = await mesh.serve_app(echo_app)
        with pytest.raises((asyncio.IncompleteReadError, ConnectionError)):
            await roundtrip(mesh, port)
        assert crl.rejections("destination") == 1  # still revoked: the good CRL stands


async def test_crl_update_revoking_the_server_closes_the_outbound_side(tmp_path: Path) -> None:
    async with mesh_with_crl(tmp_path) as (mesh, crl):
        crl.manager.start()  # no file yet: nothing revoked
        assert crl.manager.crls is None
        port = await mesh.serve_app(echo_app)
        reader, writer = await mesh.dial(port)
        writer.write(b"x")
        assert await asyncio.wait_for(reader.readexactly(1), 10) == b"x"
        crl.path.write_bytes(mesh.pki.ca.crl([mesh.pki.cert(SERVER_ID).leaf]))
        assert await crl.manager.reload()
        with contextlib.suppress(ConnectionResetError):
            assert await asyncio.wait_for(reader.read(), 10) == b""
        writer.close()
        assert crl.manager.revoked_connections == 1
        assert crl.manager.tracked == 0
