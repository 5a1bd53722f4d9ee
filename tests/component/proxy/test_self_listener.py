"""ztunnel's own HBONE listener (proxy/self_listener.py): a mesh client reaches the daemon's
metrics port over HBONE, the daemon pod's policies apply, the proxy's own ports are refused.

The client pod's real outbound proxy tunnels to ``<daemon IP>:15008`` (the daemon's pod is a
mesh workload in the state, as istiod sends it); a real ``StatsServer`` stands for :15020.
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
from collections.abc import AsyncIterator, Coroutine
from typing import Any

import pytest
import pytest_asyncio
from prometheus_client import CollectorRegistry, Counter

from ztunnel_py.admin.server import StatsServer
from ztunnel_py.config import PORT_HBONE, ProxyMode
from ztunnel_py.proxy.self_listener import SelfListener, self_listener_wanted
from ztunnel_py.rbac.model import Action, Authorization, Match, Scope, StringMatch, StringMatchKind
from ztunnel_py.state.model import InboundProtocol, Workload
from ztunnel_py.state.store import UpdateBatch
from ztunnel_py.testing.proxy_harness import (
    CLIENT_ID,
    Mesh,
    connect_request,
    make_config,
    raw_hbone,
    start_mesh,
)

NAMESPACE, NAME, SA = "istio-system", "ztunnel-x7k2p", "ztunnel"


class SelfBed:
    def __init__(self, mesh: Mesh) -> None:
        self.mesh = mesh
        self.ip = ipaddress.ip_address(f"{mesh.base}.3")
        self.workload = Workload(
            uid=f"Kubernetes//Pod/{NAMESPACE}/{NAME}",
            name=NAME,
            namespace=NAMESPACE,
            service_account=SA,
            workload_ips=(self.ip,),
            protocol=InboundProtocol.HBONE,
        )
        self.tasks: list[asyncio.Task[None]] = []
        config = dataclasses.replace(
            mesh.config, pod_name=NAME, pod_namespace=NAMESPACE, service_account=SA
        )
        self.listener = SelfListener(dataclasses.replace(mesh.inputs, config=config), self.spawn)
        self.registry = CollectorRegistry()
        Counter("ztunnel_self_marker", "what the scrape must show", registry=self.registry).inc()
        self.stats = StatsServer(self.registry)
        self.stats_port = 0

    def spawn(self, name: str, coro: Coroutine[Any, Any, None]) -> None:
        self.tasks.append(asyncio.create_task(coro, name=name))

    async def scrape_through_mesh(self) -> bytes:
        """GET /metrics from the client pod: outbound -> HBONE -> self listener -> :stats."""
        self.mesh.destination.target = (self.ip, self.stats_port)
        reader, writer = await asyncio.open_connection(
            str(self.mesh.outbound_addr[0]), self.mesh.outbound_addr[1]
        )
        writer.write(b"GET /metrics HTTP/1.1\r\nHost: ztunnel\r\nConnection: close\r\n\r\n")
        try:
            return await asyncio.wait_for(reader.read(), 10)
        except ConnectionError:
            return b""
        finally:
            writer.close()


@pytest_asyncio.fixture
async def bed() -> AsyncIterator[SelfBed]:
    mesh = await start_mesh()
    bed = SelfBed(mesh)
    await bed.stats.start(str(bed.ip), 0)
    bed.stats_port = bed.stats.http.port
    try:
        yield bed
    finally:
        await bed.listener.stop(1.0)
        await bed.stats.http.close()
        await mesh.stop()


async def start_listener(bed: SelfBed) -> None:
    bed.listener.state_changed()
    assert bed.tasks == []  # its workload is not known yet: nothing starts
    bed.mesh.state.apply(UpdateBatch(workloads=(bed.workload,)))
    bed.listener.state_changed()
    (task,) = bed.tasks
    await task
    assert bed.listener.servers, bed.listener.error


def test_wanted_only_in_shared_mode_with_the_downward_api_names() -> None:
    named = {"pod_name": NAME, "pod_namespace": NAMESPACE, "service_account": SA}
    assert self_listener_wanted(make_config(**named))
    assert not self_listener_wanted(make_config(**{**named, "pod_name": ""}))
    assert not self_listener_wanted(make_config(**named, proxy_mode=ProxyMode.DEDICATED))


@pytest.mark.asyncio
async def test_mesh_client_scrapes_the_daemon_over_hbone(bed: SelfBed) -> None:
    await start_listener(bed)
    assert bed.listener.dump() == {
        "listening": [f"{bed.ip}:{PORT_HBONE}"],
        "workload": f"{NAMESPACE}/{NAME}",
        "identity": f"spiffe://cluster.local/ns/{NAMESPACE}/sa/{SA}",
        "error": None,
    }
    answer = await bed.scrape_through_mesh()
    assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
    assert b"ztunnel_self_marker_total 1.0" in answer


@pytest.mark.asyncio
async def test_daemon_pod_policies_apply(bed: SelfBed) -> None:
    await start_listener(bed)
    only_prometheus = Authorization(
        name="only-prometheus",
        namespace=NAMESPACE,
        scope=Scope.NAMESPACE,
        action=Action.ALLOW,
        rules=(
            (
                (
                    Match(
                        principals=(
                            StringMatch(
                                StringMatchKind.EXACT, "cluster.local/ns/monitoring/sa/prometheus"
                            ),
                        )
                    ),
                ),
            ),
        ),
    )
    bed.mesh.state.apply(UpdateBatch(policies=(only_prometheus,)))
    assert await bed.scrape_through_mesh() == b""  # the client pod is not Prometheus
    (answer,) = await raw_hbone(
        bed.mesh,
        [connect_request(f"{bed.ip}:{bed.stats_port}")],
        identity=CLIENT_ID,
        address=(bed.ip, PORT_HBONE),
    )
    assert answer.status == 401
    bed.mesh.state.apply(UpdateBatch(removed_policies=(only_prometheus.key,)))
    assert (await bed.scrape_through_mesh()).startswith(b"HTTP/1.1 200")


@pytest.mark.asyncio
async def test_the_proxy_s_own_ports_are_refused(bed: SelfBed) -> None:
    await start_listener(bed)
    answers = await raw_hbone(
        bed.mesh,
        [connect_request(f"{bed.ip}:{port}") for port in (15001, 15006, PORT_HBONE)],
        address=(bed.ip, PORT_HBONE),
    )
    assert [a.status for a in answers] == [400, 400, 400]


@pytest.mark.asyncio
async def test_a_taken_port_is_an_error_and_the_daemon_serves_on(bed: SelfBed) -> None:
    taken = await asyncio.start_server(lambda r, w: None, str(bed.ip), PORT_HBONE)
    try:
        await start_listener_expecting_failure(bed)
        assert bed.listener.error is not None
        assert f"cannot listen on :{PORT_HBONE} at {bed.ip}" in bed.listener.error
        assert bed.listener.dump()["listening"] == []
    finally:
        taken.close()


async def start_listener_expecting_failure(bed: SelfBed) -> None:
    bed.mesh.state.apply(UpdateBatch(workloads=(bed.workload,)))
    bed.listener.state_changed()
    (task,) = bed.tasks
    await task  # logs and returns: never raises into the daemon's task set
    assert not bed.listener.servers
