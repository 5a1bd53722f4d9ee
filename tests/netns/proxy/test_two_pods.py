"""Two pods in two network namespaces on one veth link, as in-pod mode sees them.

Each pod's :15001/:15006/:15008 listeners are created inside its netns by the test (as the
in-pod workload manager does); the client pod redirects its outbound TCP to :15001 with a plain
iptables REDIRECT that skips the proxy's own marked packets; the server pod runs the app. Bytes
go app -> REDIRECT -> outbound (SO_ORIGINAL_DST, routing) -> HBONE mTLS to the server pod's
:15008 -> inbound (authority, policy) -> app, and back.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import random
import shutil
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
import pytest_asyncio

from ztunnel_py.proxy.certificates import FetchedCertificates
from ztunnel_py.proxy.inputs import PodInputs, ProxyInputs
from ztunnel_py.proxy.pod import PodProxy, pod_pool, start_pod_proxy
from ztunnel_py.proxy.pool import HbonePool
from ztunnel_py.proxy.sockopt import PodSocketFactory, SoOriginalDst
from ztunnel_py.state.store import ProxyState, UpdateBatch
from ztunnel_py.testing.netns import Netns, NetnsPool
from ztunnel_py.testing.privileged import require
from ztunnel_py.testing.proxy_harness import (
    CLIENT_ID,
    SERVER_ID,
    Pki,
    bulk_app,
    echo_app,
    make_config,
    pattern,
    pod,
)

MiB = 1024 * 1024
APP_PORT = 8080


def listeners_in(ns: Netns) -> tuple[socket.socket, socket.socket, socket.socket]:
    def make() -> list[socket.socket]:
        out = []
        for port in (15001, 15006, 15008):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, 0x539)
            s.bind(("0.0.0.0", port))
            s.listen(1024)
            s.setblocking(False)
            out.append(s)
        return out

    a, b, c = ns.run(make)
    return a, b, c


@dataclass
class TwoPods:
    client_ns: Netns
    server_ns: Netns
    client_ip: str
    server_ip: str
    proxies: list[PodProxy]
    pool: HbonePool
    app_servers: list[asyncio.Server]

    async def dial(self, port: int = APP_PORT) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        sock = self.client_ns.socket()
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, (self.server_ip, port))
        return await asyncio.open_connection(sock=sock)


@pytest_asyncio.fixture
async def two_pods() -> AsyncIterator[TwoPods]:
    require(shutil.which("iptables") is not None, "iptables is not installed")
    with NetnsPool() as nets:
        client_ns = nets.netns("client")
        server_ns = nets.netns("server")
        subnet = random.Random().randrange(1, 250)
        client_ip, server_ip = f"10.231.{subnet}.1", f"10.231.{subnet}.2"
        nets.veth_pair(client_ns, f"{client_ip}/24", server_ns, f"{server_ip}/24")
        client_ns.sh(
            "iptables",
            "-t",
            "nat",
            "-A",
            "OUTPUT",
            "-p",
            "tcp",
            "!",
            "-d",
            "127.0.0.0/8",
            "-m",
            "mark",
            "!",
            "--mark",
            "0x539/0xfff",
            "-j",
            "REDIRECT",
            "--to-ports",
            "15001",
        )
        config = make_config()
        pki = Pki()
        client = pod("client", ipaddress.ip_address(client_ip), CLIENT_ID.service_account)
        server = pod("server", ipaddress.ip_address(server_ip), SERVER_ID.service_account)
        state = ProxyState()
        state.apply(UpdateBatch(workloads=(client, server)))
        inputs = ProxyInputs(
            config=config,
            state=state,
            certificates=FetchedCertificates(pki.fetch),
            original_destination=SoOriginalDst(),
            rng=random.Random(1),
        )
        proxies: list[PodProxy] = []
        pools: list[HbonePool] = []
        for workload, ns in ((client, client_ns), (server, server_ns)):
            sockets = PodSocketFactory(config, ns.fd)
            pool = pod_pool(inputs, sockets)
            pools.append(pool)
            pod_inputs = PodInputs(workload=workload, sockets=sockets, pool=pool)
            proxies.append(await start_pod_proxy(inputs, pod_inputs, listeners_in(ns)))
        apps = []
        for handler, port in ((echo_app, APP_PORT), (bulk_app, APP_PORT + 1)):
            app_sock = server_ns.socket()
            app_sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            app_sock.bind((server_ip, port))
            apps.append(await asyncio.start_server(handler, sock=app_sock, backlog=1024))
        pods = TwoPods(client_ns, server_ns, client_ip, server_ip, proxies, pools[0], apps)
        try:
            yield pods
        finally:
            for app in apps:
                app.close()
            for proxy in proxies:
                await proxy.stop(1.0)
            for pool in pools:
                await pool.close()


@pytest.mark.root
@pytest.mark.asyncio
async def test_request_response_through_both_proxies(two_pods: TwoPods) -> None:
    reader, writer = await two_pods.dial()
    for i in range(20):
        msg = pattern(1024, i)
        writer.write(msg)
        assert await reader.readexactly(1024) == msg
    writer.close()
    # It really went through HBONE: one pooled mTLS connection, one inbound stream.
    assert two_pods.pool.connections_made == 1
    assert two_pods.proxies[1].inbound.tracker.handled >= 1
    assert two_pods.proxies[0].outbound.tracker.handled == 1


@pytest.mark.root
@pytest.mark.asyncio
@pytest.mark.parametrize("direction", ["UP", "DOWN"])
async def test_bulk_with_checksums(two_pods: TwoPods, direction: str) -> None:
    size = 16 * MiB
    data = pattern(size, 11)
    reader, writer = await two_pods.dial(APP_PORT + 1)
    if direction == "UP":
        writer.write(f"UP {size}\n".encode())
        writer.write(data)
        await writer.drain()
        answer = (await reader.readline()).strip().decode()
        assert answer == hashlib.sha256(data).hexdigest()
    else:
        writer.write(f"DOWN {size} 11\n".encode())
        got = await reader.readexactly(size)
        assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest()
    writer.close()


@pytest.mark.root
@pytest.mark.asyncio
async def test_inbound_sees_the_client_pod_as_source(two_pods: TwoPods) -> None:
    seen: list[str] = []

    class Recorder:
        def check(self, conn):
            seen.append(f"{conn.src_ip} {conn.src_identity} {conn.dst_ip}:{conn.dst_port}")
            from ztunnel_py.rbac.evaluate import Decision

            return Decision(True, None, "recorded")

    two_pods.proxies[1].inbound.authorizer = Recorder()
    reader, writer = await two_pods.dial()
    writer.write(b"x")
    assert await reader.readexactly(1) == b"x"
    writer.close()
    # The HBONE connection comes from the client pod's own netns, so from its IP.
    assert seen == [f"{two_pods.client_ip} {CLIENT_ID} {two_pods.server_ip}:{APP_PORT}"]
