"""Live connections as ``/config_dump`` lists them (ztunnel's ``workloadState.connections``).

A real HBONE tunnel between two pods of the proxy harness: while it is open the client's
workload lists it as outbound and the server's as inbound; once closed, both lists are empty.
"""

from __future__ import annotations

import asyncio

import pytest

from ztunnel_py.proxy.conntrack import ConnectionTracker
from ztunnel_py.testing.proxy_harness import echo_app, start_mesh

CLIENT_UID = "Kubernetes//Pod/default/client"
SERVER_UID = "Kubernetes//Pod/default/server"


@pytest.mark.asyncio
async def test_open_tunnel_is_listed_on_both_sides_and_gone_when_closed() -> None:
    conntrack = ConnectionTracker()
    mesh = await start_mesh(conntrack=conntrack)
    try:
        port = await mesh.serve_app(echo_app)
        reader, writer = await mesh.dial(port)
        writer.write(b"hi")
        assert await reader.readexactly(2) == b"hi"
        local = writer.get_extra_info("sockname")
        dump = conntrack.dump()
        assert dump[CLIENT_UID] == {
            "inbound": [],
            "outbound": [
                {
                    "src": f"{mesh.client_ip}:{local[1]}",  # the pod's address, as routed
                    "originalDst": f"{mesh.server_ip}:{port}",
                    "actualDst": f"{mesh.server_ip}:15008",
                    "protocol": "HBONE",
                }
            ],
        }
        (inbound,) = dump[SERVER_UID]["inbound"]
        assert inbound["actualDst"] == f"{mesh.server_ip}:{port}"
        # the tunnel's peer (the harness dials from loopback, a real pod from its own address)
        host, _, src_port = inbound["src"].rpartition(":")
        assert host.startswith("127.") and int(src_port) > 0
        assert inbound["originalDst"] is None  # the client named no service
        assert inbound["protocol"] == "HBONE"
        assert dump[SERVER_UID]["outbound"] == []

        writer.close()
        for _ in range(500):
            if not conntrack.dump():
                break
            await asyncio.sleep(0.01)
        assert conntrack.dump() == {}
    finally:
        await mesh.stop()
