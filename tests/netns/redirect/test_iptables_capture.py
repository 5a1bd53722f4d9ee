"""iptables mode: istio-cni's in-pod rules send pod traffic to the pod's listeners (root)."""

from __future__ import annotations

import asyncio
import ipaddress
import os
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from ztunnel_py.config import WorkloadInfo
from ztunnel_py.redirect import iptables
from ztunnel_py.redirect.listeners import PodListeners
from ztunnel_py.redirect.workloads import EnrolledPod, PodProxyHandle, WorkloadManager
from ztunnel_py.state.model import Workload
from ztunnel_py.state.store import ProxyState, UpdateBatch
from ztunnel_py.testing.netns import Netns, NetnsPool

pytestmark = [pytest.mark.root]

SO_ORIGINAL_DST = 80
POD_IP, PEER_IP = "10.77.0.1", "10.77.0.2"


def original_dst(sock: socket.socket) -> tuple[str, int]:
    """The pre-NAT destination of an accepted IPv4 (or v4-mapped) connection."""
    raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    port, addr = struct.unpack_from("!2xH4s", raw)
    return socket.inet_ntoa(addr), port


@dataclass
class Capture:
    listener_port: int
    original_dst: tuple[str, int]


@dataclass
class _Handle:
    servers: list[asyncio.Server]

    async def stop(self, deadline_s: float) -> None:
        for server in self.servers:
            server.close()


@dataclass
class CapturingFactory:
    """Answers ``captured`` on every listener and records where each connection was going."""

    captures: list[Capture] = field(default_factory=list)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)

    async def start(self, pod: EnrolledPod, sockets: PodListeners) -> PodProxyHandle:
        servers = []
        for listening in sockets.sockets():
            port = listening.getsockname()[1]

            async def serve(
                reader: asyncio.StreamReader, writer: asyncio.StreamWriter, port: int = port
            ) -> None:
                sock = writer.get_extra_info("socket")
                self.captures.append(Capture(port, original_dst(sock)))
                self.arrived.set()
                writer.write(b"captured")
                await writer.drain()
                writer.close()

            servers.append(await asyncio.start_server(serve, sock=listening))
        return _Handle(servers)


async def dial(ns: Netns, ip: str, port: int, *, mark: int | None = None) -> bytes:
    sock = ns.socket(socket.AF_INET, socket.SOCK_STREAM)
    if mark is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, (ip, port))
    reader, writer = await asyncio.open_connection(sock=sock)
    try:
        return await reader.read(64)
    finally:
        writer.close()


@pytest.fixture
def pod_and_peer() -> Iterator[tuple[Netns, Netns]]:
    with NetnsPool() as pool:
        pod, peer = pool.netns("ipt-pod"), pool.netns("ipt-peer")
        pool.veth_pair(pod, f"{POD_IP}/24", peer, f"{PEER_IP}/24")
        yield pod, peer


@pytest.mark.asyncio
async def test_in_pod_rules_capture_outbound_and_inbound(pod_and_peer: tuple[Netns, Netns]) -> None:
    pod, peer = pod_and_peer
    netns_file = f"/run/netns/{pod.name}"
    iptables.install(netns_file)
    iptables.install(netns_file)  # idempotent: no duplicate jumps
    assert iptables.is_installed(netns_file)
    assert pod.sh("iptables-save", "-t", "nat").stdout.count("-A OUTPUT -j ISTIO_OUTPUT") == 1

    # A real server on the peer, for traffic that must not be captured.
    server = peer.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind((PEER_IP, 8080))
    server.listen()
    server.setblocking(False)

    async def real_server() -> None:
        conn, _ = await asyncio.get_running_loop().sock_accept(server)
        conn.sendall(b"real server")
        conn.close()

    w = Workload(
        uid="uid-ipt",
        name="ipt",
        namespace="default",
        service_account="sa",
        workload_ips=(ipaddress.ip_address(POD_IP),),
    )
    state = ProxyState()
    state.apply(UpdateBatch(workloads=(w,)))
    factory = CapturingFactory()
    manager = WorkloadManager(state, factory)
    await manager.enroll(
        w.uid, WorkloadInfo("default", "ipt", "sa"), os.open(netns_file, os.O_RDONLY)
    )
    try:
        # Outbound from the app: lands on :15001, SO_ORIGINAL_DST is what it dialled.
        assert await dial(pod, PEER_IP, 8080) == b"captured"
        assert factory.captures[-1] == Capture(15001, (PEER_IP, 8080))

        # Inbound plaintext to the pod: lands on :15006.
        assert await dial(peer, POD_IP, 9090) == b"captured"
        assert factory.captures[-1] == Capture(15006, (POD_IP, 9090))

        # Inbound HBONE port is not redirected: the :15008 listener takes it directly.
        assert await dial(peer, POD_IP, 15008) == b"captured"
        assert factory.captures[-1].listener_port == 15008

        # ztunnel's own (marked) sockets are never captured.
        served = asyncio.get_running_loop().create_task(real_server())
        assert await dial(pod, PEER_IP, 8080, mark=0x539) == b"real server"
        await served
        assert len(factory.captures) == 3
    finally:
        await manager.shutdown(0.0)
        server.close()

    iptables.remove(netns_file)
    assert not iptables.is_installed(netns_file)
    assert "ISTIO_" not in pod.sh("iptables-save").stdout
    assert "lookup 100" not in pod.sh("ip", "rule").stdout
