"""XDS_ON_DEMAND on the outbound path: an unknown destination is looked up before routing."""

from __future__ import annotations

import pytest

from ztunnel_py.state.store import UpdateBatch
from ztunnel_py.testing.proxy_harness import echo_app, pattern, start_mesh


@pytest.mark.asyncio
async def test_unknown_destination_is_fetched_on_demand_then_tunnelled() -> None:
    mesh = await start_mesh()
    try:
        port = await mesh.serve_app(echo_app)
        server = mesh.server
        mesh.state.apply(UpdateBatch(removed_addresses=(server.uid,)))  # istiod did not send it
        asked: list[str] = []

        async def demand(key: str) -> None:  # istiod answers with the workload
            asked.append(key)
            mesh.state.apply(UpdateBatch(workloads=(server,)))

        mesh.outbound.demand = demand
        reader, writer = await mesh.dial(port)
        writer.write(pattern(1000, 1))
        assert await reader.readexactly(1000) == pattern(1000, 1)
        writer.close()
        assert asked == [f"/{mesh.server_ip}"]
        assert mesh.inbound.connections == 1  # HBONE to the server's :15008, not passthrough

        # A known destination needs no lookup.
        reader, writer = await mesh.dial(port)
        writer.write(b"again")
        assert await reader.readexactly(5) == b"again"
        writer.close()
        assert asked == [f"/{mesh.server_ip}"]
    finally:
        await mesh.stop()
