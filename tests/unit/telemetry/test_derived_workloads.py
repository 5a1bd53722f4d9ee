"""Labels from a peer's baggage (ztunnel's ``DerivedWorkload``): the source of a tunnel that
came through an east-west gateway, and the destination behind one."""

from __future__ import annotations

import ipaddress

from prometheus_client import CollectorRegistry

from ztunnel_py.hbone.headers import Baggage
from ztunnel_py.state.model import Workload
from ztunnel_py.state.store import ProxyState, UpdateBatch
from ztunnel_py.telemetry.connections import ConnectionRecord, Direction
from ztunnel_py.telemetry.metrics import ConnectionLabels, ConnectionMetrics, Reporter
from ztunnel_py.telemetry.sink import ProxyTelemetry

ip = ipaddress.ip_address
CLIENT_BAGGAGE = Baggage(
    cluster_id="cluster-a",
    namespace="shop",
    workload_name="frontend",
    service_name="frontend-app",
    revision="v3",
    region="eu",
    zone="eu-1",
)
SERVER = Workload(
    uid="Kubernetes//Pod/shop/cart-1",
    name="cart-1",
    namespace="shop",
    workload_ips=(ip("10.1.0.2"),),
    network="net-b",
    workload_name="cart",
    canonical_name="cart",
)
# The gateway's workload sits at the address gateway-forwarded tunnels come from.
GATEWAY = Workload(
    uid="NetworkGateway/net-b/10.1.0.100/15008",
    name="NetworkGateway/net-b/10.1.0.100/15008",
    namespace="istio-system",
    workload_ips=(ip("10.1.0.100"),),
    network="net-b",
    service_account="eastwest",
)


def test_baggage_fills_the_source_only_when_the_source_workload_is_unknown() -> None:
    derived = ConnectionLabels.build(reporter=Reporter.DESTINATION, derived_source=CLIENT_BAGGAGE)
    assert (derived.source_workload, derived.source_canonical_service) == (
        "frontend",
        "frontend-app",
    )
    assert (derived.source_app, derived.source_version) == ("frontend", "v3")  # as ztunnel
    assert (derived.source_cluster, derived.source_region, derived.source_zone) == (
        "cluster-a",
        "eu",
        "eu-1",
    )
    known = ConnectionLabels.build(
        reporter=Reporter.DESTINATION, source=SERVER, derived_source=CLIENT_BAGGAGE
    )
    assert known.source_workload == "cart"  # the state's workload wins


def test_baggage_overrides_the_gateway_as_destination() -> None:
    labels = ConnectionLabels.build(
        reporter=Reporter.SOURCE,
        destination=GATEWAY,
        derived_destination=Baggage(namespace="shop", workload_name="cart", service_name="cart"),
        destination_identity="spiffe://cluster.local/ns/shop/sa/cart",
    )
    assert (labels.destination_workload, labels.destination_workload_namespace) == ("cart", "shop")
    assert labels.destination_principal == "spiffe://cluster.local/ns/shop/sa/cart"


def _opened(registry: CollectorRegistry, **labels: str) -> float:
    return sum(
        s.value
        for family in registry.collect()
        for s in family.samples
        if s.name == "istio_tcp_connections_opened_total"
        and all(s.labels.get(k) == v for k, v in labels.items())
    )


def test_a_tunnel_from_a_gateway_is_not_attributed_to_the_gateway() -> None:
    state = ProxyState()
    state.apply(UpdateBatch(workloads=(SERVER, GATEWAY)))
    registry = CollectorRegistry()
    sink = ProxyTelemetry(ConnectionMetrics(registry), state, network="net-b")
    for from_gateway in (False, True):
        sink.connection_opened(
            ConnectionRecord(
                direction=Direction.INBOUND,
                src=(ip("10.1.0.100"), 40000),
                dst=(ip("10.1.0.2"), 8080),
                src_identity="spiffe://cluster.local/ns/shop/sa/frontend",
                dst_workload=SERVER,
                src_baggage=CLIENT_BAGGAGE,
                from_gateway=from_gateway,
            )
        )
    # Without the gateway flag the peer address names the gateway's workload (wrong) ...
    assert _opened(registry, source_workload_namespace="istio-system") == 1
    # ... with it, the source is what the client's baggage and certificate say.
    assert (
        _opened(
            registry,
            source_workload="frontend",
            source_workload_namespace="shop",
            source_principal="spiffe://cluster.local/ns/shop/sa/frontend",
        )
        == 1
    )
