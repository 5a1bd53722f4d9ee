"""The outbound proxy reports the pod's address as the source, also when the application's
connection reaches it from loopback (eBPF redirection rewrites ``connect()`` to
127.0.0.1:15001 before the kernel picks the source address)."""

from __future__ import annotations

import asyncio
import ipaddress
from dataclasses import replace

import pytest

from ztunnel_py.proxy.outbound import pod_source
from ztunnel_py.state.model import IPAddress
from ztunnel_py.telemetry.connections import ConnectionRecord, NoTelemetry, Progress
from ztunnel_py.testing.proxy_harness import echo_app, pod, start_mesh


def ip(text: str) -> IPAddress:
    return ipaddress.ip_address(text)


DUAL_STACK = replace(
    pod("dual", ip("10.0.0.5"), "sa"), workload_ips=(ip("10.0.0.5"), ip("fd00::5"))
)


@pytest.mark.parametrize(
    ("src", "expected"),
    [
        ((ip("127.0.0.1"), 40000), (ip("10.0.0.5"), 40000)),
        ((ip("::1"), 40000), (ip("fd00::5"), 40000)),
        ((ip("10.0.0.5"), 40000), (ip("10.0.0.5"), 40000)),  # already the pod's
        ((ip("10.9.9.9"), 40000), (ip("10.9.9.9"), 40000)),  # not loopback: left alone
    ],
)
def test_loopback_sources_become_the_pods_address_of_the_same_family(
    src: tuple[IPAddress, int], expected: tuple[IPAddress, int]
) -> None:
    assert pod_source(src, DUAL_STACK) == expected


def test_a_loopback_source_without_a_pod_address_of_its_family_is_kept() -> None:
    v4_only = pod("v4", ip("10.0.0.5"), "sa")
    assert pod_source((ip("::1"), 1), v4_only) == (ip("::1"), 1)


class Opened(NoTelemetry):
    def __init__(self) -> None:
        self.records: list[ConnectionRecord] = []

    def connection_opened(self, record: ConnectionRecord, progress: Progress | None = None) -> None:
        self.records.append(record)


@pytest.mark.asyncio
async def test_a_connection_from_loopback_is_reported_from_the_pod() -> None:
    outbound = Opened()
    mesh = await start_mesh(telemetry=outbound, server_telemetry=NoTelemetry())
    try:
        port = await mesh.serve_app(echo_app)
        mesh.destination.target = (mesh.server_ip, port)
        # What eBPF redirection hands the proxy: the app's socket on 127.0.0.1.
        reader, writer = await asyncio.open_connection(
            str(mesh.outbound_addr[0]), mesh.outbound_addr[1], local_addr=("127.0.0.1", 0)
        )
        local_port = writer.get_extra_info("sockname")[1]
        writer.write(b"hello")
        writer.write_eof()
        assert await reader.read() == b"hello"
        writer.close()
        (record,) = [r for r in outbound.records if r.direction.value == "outbound"]
        assert record.src == (mesh.client_ip, local_port)
    finally:
        await mesh.stop()
