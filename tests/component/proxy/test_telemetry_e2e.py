"""Metrics and access logs of both ends of a real tunnel (ProxyTelemetry on each side).

The client pod's outbound server and the server pod's inbound server each report to their
own ``ProxyTelemetry`` and registry, as two nodes would. Byte counts are checked while the
connection is open (after ``flush()``) and after it closed, per reporter; refusals (401 on
HBONE, a plaintext deny, an unreachable app) and policy-change closes are checked on both
sides, in the counters and in the access log.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from ztunnel_py.proxy.authorization import PermitAll
from ztunnel_py.proxy.conntrack import POLICY_CHANGE_ERROR, ConnectionTracker
from ztunnel_py.proxy.inbound_plain import InboundPlaintextServer
from ztunnel_py.proxy.inputs import PodInputs
from ztunnel_py.proxy.sockopt import PodSocketFactory
from ztunnel_py.rbac.evaluate import ConnectionInfo, Decision
from ztunnel_py.state.store import ProxyState
from ztunnel_py.telemetry import logging as ztlogging
from ztunnel_py.telemetry.metrics import ConnectionLabels, ConnectionMetrics, Reporter
from ztunnel_py.telemetry.metrics import SecurityPolicy as Security
from ztunnel_py.telemetry.sink import ProxyTelemetry
from ztunnel_py.testing.proxy_harness import (
    CLIENT_ID,
    SERVER_ID,
    FixedDestination,
    Mesh,
    echo_app,
    listen,
    make_config,
    pattern,
    start_mesh,
)

UP = 300_000  # client -> server
DOWN = 120_000  # server -> client


class Node:
    """One side's registry and sink."""

    def __init__(self, state: ProxyState) -> None:
        self.registry = CollectorRegistry()
        self.sink = ProxyTelemetry(ConnectionMetrics(self.registry), state)

    def series(self, name: str, **match: str) -> list[dict[str, str]]:
        return [
            dict(s.labels)
            for family in self.registry.collect()
            for s in family.samples
            if s.name == name and all(s.labels.get(k) == v for k, v in match.items())
        ]

    def opened_labels(self) -> dict[str, str]:
        (labels,) = self.series("istio_tcp_connections_opened_total")
        return labels

    def get(self, name: str, labels: dict[str, str]) -> float:
        value = self.registry.get_sample_value(name, labels)
        return 0.0 if value is None else value

    def flags(self, name: str, labels: dict[str, str], flags: str) -> float:
        return self.get(name, {**labels, "response_flags": flags})


class Both:
    def __init__(self) -> None:
        self.state = ProxyState()
        self.client = Node(self.state)
        self.server = Node(self.state)

    async def mesh(self, **kw: Any) -> Mesh:
        return await start_mesh(
            state=self.state, telemetry=self.client.sink, server_telemetry=self.server.sink, **kw
        )


@pytest.fixture
def access_log() -> Iterator[io.StringIO]:
    """The access log in the project's JSON format; logging is restored afterwards."""
    root = logging.getLogger()
    saved_handlers, saved_level = list(root.handlers), root.level
    saved_levels = {n: logging.getLogger(n).level for n in ("access", "ztunnel_py")}
    buffer = io.StringIO()
    ztlogging.configure("info", json_format=True, stream=buffer)
    yield buffer
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in saved_handlers:
        root.addHandler(handler)
    root.setLevel(saved_level)
    for name, level in saved_levels.items():
        logging.getLogger(name).setLevel(level)


def access_lines(buffer: io.StringIO, direction: str) -> list[dict[str, Any]]:
    lines = [json.loads(line) for line in buffer.getvalue().splitlines()]
    return [r for r in lines if r["scope"] == "access" and r.get("direction") == direction]


async def until(condition: Callable[[], bool], what: str) -> None:
    for _ in range(500):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"never happened: {what}")


async def up_then_down(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Read UP bytes, answer DOWN bytes, then wait for the client's EOF and close."""
    try:
        await reader.readexactly(UP)
        writer.write(pattern(DOWN, 2))
        await writer.drain()
        await reader.read()
        writer.write_eof()
        await writer.drain()
    finally:
        writer.close()


class DenyAll:
    def check(self, conn: ConnectionInfo) -> Decision:
        return Decision(False, "default/deny-all", "denied by policy default/deny-all")


@pytest.mark.asyncio
async def test_bytes_while_open_and_at_close_on_both_sides(access_log: io.StringIO) -> None:
    both = Both()
    mesh = await both.mesh()
    try:
        port = await mesh.serve_app(up_then_down)
        reader, writer = await mesh.dial(port)
        writer.write(pattern(UP, 1))
        assert await reader.readexactly(DOWN) == pattern(DOWN, 2)

        # (a) Still open: the app read UP bytes and the client got DOWN bytes, so every
        # splice already counted them; a flush (what a scrape does) brings them into metrics.
        client, server = both.client, both.server
        assert len(client.sink.live_connections()) == len(server.sink.live_connections()) == 1
        src_labels = client.opened_labels()
        dst_labels = server.opened_labels()
        assert client.get("istio_tcp_received_bytes_total", src_labels) == 0  # not yet flushed
        client.sink.flush()
        server.sink.flush()
        for node, labels in ((client, src_labels), (server, dst_labels)):
            assert node.get("istio_tcp_received_bytes_total", labels) == UP
            assert node.get("istio_tcp_sent_bytes_total", labels) == DOWN
            assert node.get("istio_tcp_connections_closed_total", labels) == 0

        # (b) Close cleanly; the totals stay exact and each side logs one line.
        writer.write_eof()
        assert await reader.read() == b""
        writer.close()
        await until(
            lambda: not client.sink.live_connections() and not server.sink.live_connections(),
            "both sides saw the close",
        )
        for node, labels in ((client, src_labels), (server, dst_labels)):
            assert node.get("istio_tcp_received_bytes_total", labels) == UP
            assert node.get("istio_tcp_sent_bytes_total", labels) == DOWN
            assert node.get("istio_tcp_connections_opened_total", labels) == 1
            assert node.flags("istio_tcp_connections_closed_total", labels, "-") == 1
            assert node.series("istio_tcp_connections_failed_total") == []

        expected_src = ConnectionLabels.build(
            reporter=Reporter.SOURCE,
            source=mesh.client,
            source_identity=str(CLIENT_ID),
            destination=mesh.server,
            destination_identity=str(SERVER_ID),
            security_policy=Security.MUTUAL_TLS,
        ).as_dict()
        assert src_labels == expected_src
        assert dst_labels["reporter"] == "destination"
        assert dst_labels["source_principal"] == str(CLIENT_ID)  # the verified certificate
        assert dst_labels["destination_workload_namespace"] == "default"
        assert dst_labels["connection_security_policy"] == "mutual_tls"

        (out,) = access_lines(access_log, "outbound")
        (inb,) = access_lines(access_log, "inbound")
        assert out["message"] == inb["message"] == "connection complete"
        assert out["level"] == inb["level"] == "info"
        assert (out["bytes_sent"], out["bytes_recv"]) == (UP, DOWN)  # the client's view
        assert (inb["bytes_sent"], inb["bytes_recv"]) == (DOWN, UP)  # the server's view
        assert out["dst.addr"] == f"{mesh.server_ip}:15008"
        assert out["dst.hbone_addr"] == inb["dst.hbone_addr"] == f"{mesh.server_ip}:{port}"
        assert inb["dst.addr"] == f"{mesh.server_ip}:15008"
        assert out["src.identity"] == inb["src.identity"] == str(CLIENT_ID)
        assert out["dst.identity"] == inb["dst.identity"] == str(SERVER_ID)
        assert "error" not in out and "error" not in inb
        # One trace id names the connection on both hops: the client's sent traceparent.
        assert set(out["outbound"]) == {"id"}
        assert len(out["outbound"]["id"]) == 32
        assert inb["inbound"] == {"id": out["outbound"]["id"], "peer": inb["src.addr"]}
    finally:
        await mesh.stop()


@pytest.mark.asyncio
async def test_authorization_deny_is_recorded_on_both_sides(access_log: io.StringIO) -> None:
    both = Both()
    mesh = await both.mesh(authorizer=DenyAll())
    try:
        port = await mesh.serve_app(echo_app)
        reader, writer = await mesh.dial(port)
        writer.write(b"hello")
        with pytest.raises(ConnectionResetError):
            await reader.read()
        writer.close()
        client, server = both.client, both.server
        await until(
            lambda: (
                bool(client.series("istio_tcp_connections_failed_total"))
                and bool(server.series("istio_tcp_connections_failed_total"))
            ),
            "both sides recorded the failure",
        )
        for node in (client, server):
            labels = node.opened_labels()
            assert node.get("istio_tcp_connections_opened_total", labels) == 1
            assert node.flags("istio_tcp_connections_closed_total", labels, "DENY") == 1
            assert node.flags("istio_tcp_connections_failed_total", labels, "DENY") == 1
            assert node.get("istio_tcp_received_bytes_total", labels) == 0
            assert node.sink.live_connections() == []

        (inb,) = access_lines(access_log, "inbound")
        assert inb["level"] == "error" and inb["message"] == "connection complete"
        assert inb["error"].startswith("connection closed due to policy rejection: ")
        assert "denied by policy default/deny-all" in inb["error"]
        assert inb["dst.hbone_addr"] == f"{mesh.server_ip}:{port}"
        (out,) = access_lines(access_log, "outbound")
        assert out["level"] == "error"
        assert out["error"] == "http status: 401 Unauthorized"
        assert (out["bytes_sent"], out["bytes_recv"]) == (0, 0)
    finally:
        await mesh.stop()


@pytest.mark.asyncio
async def test_unreachable_app_is_connect_on_both_sides(access_log: io.StringIO) -> None:
    both = Both()
    mesh = await both.mesh()
    try:
        closed = listen(mesh.server_ip, 0)
        port = closed.getsockname()[1]
        closed.close()  # nothing listens there now
        reader, writer = await mesh.dial(port)
        with pytest.raises(ConnectionResetError):
            await reader.read()
        writer.close()
        client, server = both.client, both.server
        await until(
            lambda: (
                bool(client.series("istio_tcp_connections_failed_total"))
                and bool(server.series("istio_tcp_connections_failed_total"))
            ),
            "both sides recorded the failure",
        )
        for node in (client, server):
            labels = node.opened_labels()
            assert node.flags("istio_tcp_connections_failed_total", labels, "CONNECT") == 1
        (out,) = access_lines(access_log, "outbound")
        assert out["error"] == "http status: 503 Service Unavailable"
        (inb,) = access_lines(access_log, "inbound")
        assert "connection refused" in inb["error"]
    finally:
        await mesh.stop()


@pytest.mark.asyncio
async def test_policy_change_close_is_deny(access_log: io.StringIO) -> None:
    both = Both()
    conntrack = ConnectionTracker()
    mesh = await both.mesh(conntrack=conntrack)
    try:
        port = await mesh.serve_app(echo_app)
        reader, writer = await mesh.dial(port)
        writer.write(b"before")
        assert await reader.readexactly(6) == b"before"
        (handle,) = list(conntrack)
        handle.close(POLICY_CHANGE_ERROR)  # what on_policy_change does for a denied connection
        with pytest.raises(ConnectionResetError):
            await reader.read()
        writer.close()
        client, server = both.client, both.server
        await until(
            lambda: not client.sink.live_connections() and not server.sink.live_connections(),
            "both sides saw the close",
        )
        labels = server.opened_labels()
        assert server.flags("istio_tcp_connections_closed_total", labels, "DENY") == 1
        assert server.flags("istio_tcp_connections_failed_total", labels, "DENY") == 1
        assert server.get("istio_tcp_received_bytes_total", labels) == 6
        assert server.get("istio_tcp_sent_bytes_total", labels) == 6
        (inb,) = access_lines(access_log, "inbound")
        assert inb["level"] == "error" and inb["error"] == POLICY_CHANGE_ERROR
        assert (inb["bytes_sent"], inb["bytes_recv"]) == (6, 6)
        # The client only saw its tunnel reset: a failed connection, bytes still counted.
        src = client.opened_labels()
        assert client.series("istio_tcp_connections_closed_total", response_flags="-") == []
        assert client.get("istio_tcp_received_bytes_total", src) == 6
        (out,) = access_lines(access_log, "outbound")
        assert out["level"] == "error" and (out["bytes_sent"], out["bytes_recv"]) == (6, 6)
    finally:
        await mesh.stop()


@pytest.mark.asyncio
async def test_plaintext_deny_and_allow(access_log: io.StringIO) -> None:
    both = Both()
    mesh = await both.mesh()
    try:
        port = await mesh.serve_app(echo_app)
        node = both.server
        for authorizer in (DenyAll(), None):
            server = InboundPlaintextServer(
                replace(
                    mesh.inputs,
                    inbound_original_destination=FixedDestination((mesh.server_ip, port)),
                    telemetry=node.sink,
                ),
                PodInputs(
                    workload=mesh.server,
                    sockets=PodSocketFactory(make_config(), mark=False),
                    pool=mesh.pool,
                    authorizer=authorizer or PermitAll(),
                ),
            )
            sock = listen(mesh.server_ip, 0)
            await server.start(sock)
            reader, writer = await asyncio.open_connection(*sock.getsockname()[:2])
            writer.write(b"plain")
            if authorizer is not None:
                with pytest.raises(ConnectionResetError):
                    await reader.read()
            else:
                assert await reader.readexactly(5) == b"plain"
                writer.write_eof()
                assert await reader.read() == b""
            writer.close()
            await until(lambda: not node.sink.live_connections(), "the close")
            await server.stop(1.0)
        (labels,) = node.series("istio_tcp_connections_failed_total")
        assert labels["response_flags"] == "DENY"
        assert labels["connection_security_policy"] == "unknown"
        assert labels["source_principal"] == "unknown"
        allowed = {**labels, "response_flags": "-"}
        assert node.get("istio_tcp_connections_closed_total", allowed) == 1
        assert node.get("istio_tcp_received_bytes_total", allowed) == 5
        assert node.get("istio_tcp_sent_bytes_total", allowed) == 5
        denied, ok = access_lines(access_log, "inbound")
        assert denied["level"] == "error"
        assert denied["error"].startswith("connection closed due to policy rejection: ")
        assert "src.identity" not in denied
        assert ok["level"] == "info" and (ok["bytes_sent"], ok["bytes_recv"]) == (5, 5)
    finally:
        await mesh.stop()


@pytest.mark.asyncio
async def test_shutdown_with_a_live_connection_leaves_nothing_behind(
    access_log: io.StringIO,
) -> None:
    both = Both()
    mesh = await both.mesh()
    stopped = False
    try:
        port = await mesh.serve_app(echo_app)
        reader, writer = await mesh.dial(port)
        writer.write(b"ping")
        assert await reader.readexactly(4) == b"ping"
        # The drain deadline passes with the connection open: its splices are aborted and
        # the handler tasks cancelled; the close must still reach telemetry.
        await mesh.stop()
        stopped = True
        writer.close()
        client, server = both.client, both.server
        await until(
            lambda: not client.sink.live_connections() and not server.sink.live_connections(),
            "both sides saw the close",
        )
        for node in (client, server):
            labels = node.opened_labels()
            assert node.get("istio_tcp_received_bytes_total", labels) == 4
            assert node.get("istio_tcp_sent_bytes_total", labels) == 4
            assert len(node.series("istio_tcp_connections_closed_total")) == 1
        lines = access_lines(access_log, "outbound") + access_lines(access_log, "inbound")
        assert len(lines) == 2
        assert all(line["level"] == "error" for line in lines)
    finally:
        if not stopped:
            await mesh.stop()
