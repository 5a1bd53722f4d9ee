"""The HBONE pool over real loopback mTLS: sharing, stream limits, idle release, failures."""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress

import pytest

from ztunnel_py.proxy.pool import WorkloadKey
from ztunnel_py.state.store import UpdateBatch
from ztunnel_py.testing.proxy_harness import Mesh, echo_app, pattern, start_mesh


async def echo_once(mesh: Mesh, port: int, i: int, *, keep: asyncio.Event | None = None) -> bool:
    reader, writer = await mesh.dial(port)
    msg = pattern(64, i)
    writer.write(msg)
    ok: bool = await reader.readexactly(len(msg)) == msg
    if keep is not None:
        await keep.wait()
    writer.close()
    await writer.wait_closed()
    return ok


@pytest.mark.asyncio
async def test_concurrent_callers_share_one_handshake() -> None:
    mesh = await start_mesh()
    try:
        port = await mesh.serve_app(echo_app)
        assert all(await asyncio.gather(*(echo_once(mesh, port, i) for i in range(40))))
        assert mesh.pool.connections_made == 1
        assert mesh.inbound.connections == 1
    finally:
        await mesh.stop()


@pytest.mark.asyncio
async def test_new_connection_after_max_streams_and_retired_ones_close() -> None:
    mesh = await start_mesh(max_streams_per_connection=2)
    try:
        port = await mesh.serve_app(echo_app)
        hold = asyncio.Event()
        tasks = [asyncio.create_task(echo_once(mesh, port, i, keep=hold)) for i in range(5)]
        for _ in range(500):  # wait until all five tunnels are up
            if len(mesh.outbound.tracker.splices) == 5:
                break
            await asyncio.sleep(0.01)
        # 5 concurrent streams, 2 per connection: 3 connections.
        assert mesh.pool.connections_made == 3
        hold.set()
        assert all(await asyncio.gather(*tasks))
        # Retired connections (2 streams served) close once their streams are done.
        for _ in range(200):
            if mesh.inbound.connections <= 1:
                break
            await asyncio.sleep(0.01)
        assert mesh.inbound.connections <= 1
    finally:
        await mesh.stop()


@pytest.mark.asyncio
async def test_unused_connection_is_released() -> None:
    mesh = await start_mesh(unused_release_timeout_s=0.2)
    try:
        port = await mesh.serve_app(echo_app)
        assert await echo_once(mesh, port, 0)
        assert len(mesh.pool.connections()) == 1
        for _ in range(300):
            if not mesh.pool.connections() and mesh.inbound.connections == 0:
                break
            await asyncio.sleep(0.01)
        assert mesh.pool.connections() == []
        assert mesh.inbound.connections == 0
        # The next connection dials again.
        assert await echo_once(mesh, port, 1)
        assert mesh.pool.connections_made == 2
    finally:
        await mesh.stop()


@pytest.mark.asyncio
async def test_failed_dial_fails_every_waiter_and_the_next_call_retries() -> None:
    mesh = await start_mesh()
    try:
        port = await mesh.serve_app(echo_app)
        # Point the server workload at an address where no HBONE listener runs.
        dead = ipaddress.ip_address(f"{mesh.base}.9")
        moved = dataclasses.replace(mesh.server, workload_ips=(dead,))
        mesh.state.apply(UpdateBatch(workloads=(moved,)))
        mesh.destination.target = (dead, port)

        async def attempt() -> str:
            reader, writer = await asyncio.open_connection(
                str(mesh.outbound_addr[0]), mesh.outbound_addr[1]
            )
            try:
                return "data" if await reader.read() else "eof"
            except ConnectionResetError:
                return "reset"
            finally:
                writer.close()

        results = await asyncio.gather(*(attempt() for _ in range(10)))
        assert results == ["reset"] * 10
        assert mesh.pool.connections_made == 0
        key = WorkloadKey(
            src_identity=mesh.outbound.identity,
            dst_identities=frozenset(),
            src_ip=mesh.client_ip,
            dst=(dead, 15008),
        )
        assert mesh.pool.connections(key) == []
    finally:
        await mesh.stop()
