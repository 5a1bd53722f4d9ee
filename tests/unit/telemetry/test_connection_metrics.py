"""Istio's TCP connection metrics: names, labels, byte directions, close and failure counts."""

from __future__ import annotations

import ipaddress
from dataclasses import replace

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from ztunnel_py.state.model import Locality, NetworkAddress, Service, Workload
from ztunnel_py.telemetry.metrics import (
    LABEL_NAMES,
    ConnectionLabels,
    ConnectionMetrics,
    Reporter,
    ResponseFlags,
    SecurityPolicy,
)

CLIENT = Workload(
    uid="c",
    name="sleep-abc",
    namespace="client-ns",
    workload_ips=(ipaddress.ip_address("10.0.0.1"),),
    service_account="sleep",
    canonical_name="sleep",
    canonical_revision="v1",
    workload_name="sleep",
    cluster_id="cluster-a",
)
SERVER = Workload(
    uid="s",
    name="httpbin-xyz",
    namespace="server-ns",
    workload_ips=(ipaddress.ip_address("10.0.0.2"),),
    service_account="httpbin",
    canonical_name="httpbin",
    canonical_revision="v2",
    workload_name="httpbin",
    cluster_id="cluster-b",
)
SERVICE = Service(
    name="httpbin",
    namespace="server-ns",
    hostname="httpbin.server-ns.svc.cluster.local",
    vips=(NetworkAddress("", ipaddress.ip_address("10.96.0.10")),),
)
CLIENT_ID = "spiffe://cluster.local/ns/client-ns/sa/sleep"


def samples(registry: CollectorRegistry) -> dict[str, list[tuple[dict[str, str], float]]]:
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for s in family.samples:
            out.setdefault(s.name, []).append((dict(s.labels), s.value))
    return out


def value(registry: CollectorRegistry, name: str, **labels: str) -> float:
    total = 0.0
    for got, v in samples(registry).get(name, []):
        if all(got.get(k) == want for k, want in labels.items()):
            total += v
    return total


def inbound_labels(**kw: object) -> ConnectionLabels:
    return ConnectionLabels.build(
        reporter=Reporter.DESTINATION,
        source=CLIENT,
        source_identity=CLIENT_ID,
        destination=SERVER,
        destination_service=SERVICE,
        security_policy=SecurityPolicy.MUTUAL_TLS,
        **kw,  # type: ignore[arg-type]
    )


def test_exposed_names_and_exact_label_set() -> None:
    registry = CollectorRegistry()
    metrics = ConnectionMetrics(registry)
    rec = metrics.recorder(inbound_labels())
    rec.opened()
    rec.add_sent(1)
    rec.add_received(1)
    rec.closed(ResponseFlags.CONNECT)
    got = samples(registry)
    for name in (
        "istio_tcp_connections_opened_total",
        "istio_tcp_connections_closed_total",
        "istio_tcp_sent_bytes_total",
        "istio_tcp_received_bytes_total",
        "istio_tcp_connections_failed_total",
    ):
        assert name in got, sorted(got)
        (labels, _), *_ = got[name]
        assert sorted(labels) == sorted(LABEL_NAMES)
    assert len(LABEL_NAMES) == 27  # ztunnel's CommonTrafficLabels with its LocalityLabels


def test_label_values_from_workloads_service_and_identity() -> None:
    labels = inbound_labels().as_dict()
    assert labels == {
        "reporter": "destination",
        "source_workload": "sleep",
        "source_canonical_service": "sleep",
        "source_canonical_revision": "v1",
        "source_workload_namespace": "client-ns",
        "source_principal": CLIENT_ID,
        "source_app": "sleep",
        "source_version": "v1",
        "source_cluster": "cluster-a",
        "destination_service": "httpbin.server-ns.svc.cluster.local",
        "destination_service_namespace": "server-ns",
        "destination_service_name": "httpbin",
        "destination_workload": "httpbin",
        "destination_canonical_service": "httpbin",
        "destination_canonical_revision": "v2",
        "destination_workload_namespace": "server-ns",
        "destination_principal": "spiffe://cluster.local/ns/server-ns/sa/httpbin",
        "destination_app": "httpbin",
        "destination_version": "v2",
        "destination_cluster": "cluster-b",
        "request_protocol": "tcp",
        "response_flags": "-",
        "connection_security_policy": "mutual_tls",
        "source_region": "unknown",
        "source_zone": "unknown",
        "destination_region": "unknown",
        "destination_zone": "unknown",
    }


def test_missing_values_render_unknown() -> None:
    labels = ConnectionLabels.build(reporter=Reporter.DESTINATION).as_dict()
    assert labels["reporter"] == "destination"
    assert labels["request_protocol"] == "tcp"
    assert labels["response_flags"] == "-"
    assert labels["connection_security_policy"] == "unknown"
    others = {
        k: v
        for k, v in labels.items()
        if k not in {"reporter", "request_protocol", "response_flags"}
    }
    assert set(others.values()) == {"unknown"}


def test_source_principal_only_from_the_verified_identity() -> None:
    labels = ConnectionLabels.build(reporter=Reporter.DESTINATION, source=CLIENT)
    assert labels.as_dict()["source_principal"] == "unknown"  # not the workload's own SA


def test_destination_identity_overrides_the_workload_identity() -> None:
    proven = "spiffe://cluster.local/ns/server-ns/sa/other"
    labels = ConnectionLabels.build(
        reporter=Reporter.SOURCE, destination=SERVER, destination_identity=proven
    )
    assert labels.as_dict()["destination_principal"] == proven


@pytest.mark.parametrize(
    ("reporter", "sent_metric", "received_metric"),
    [
        pytest.param(
            Reporter.DESTINATION, "istio_tcp_sent_bytes_total", "istio_tcp_received_bytes_total",
            id="destination: workload view equals metric names",
        ),
        pytest.param(
            Reporter.SOURCE, "istio_tcp_received_bytes_total", "istio_tcp_sent_bytes_total",
            id="source: flipped (request bytes are received_bytes)",
        ),
    ],
)  # fmt: skip
def test_byte_directions(reporter: Reporter, sent_metric: str, received_metric: str) -> None:
    registry = CollectorRegistry()
    rec = ConnectionMetrics(registry).recorder(ConnectionLabels.build(reporter=reporter))
    rec.opened()
    rec.add_sent(100)  # bytes out of the reporter's workload
    rec.add_received(7)  # bytes into the reporter's workload
    assert value(registry, sent_metric, reporter=reporter.value) == 100
    assert value(registry, received_metric, reporter=reporter.value) == 7
    assert (rec.bytes_sent, rec.bytes_received) == (100, 7)


def test_bytes_are_visible_while_the_connection_lives() -> None:
    registry = CollectorRegistry()
    rec = ConnectionMetrics(registry).recorder(inbound_labels())
    rec.opened()
    rec.add_received(10)
    rec.add_received(5)
    assert value(registry, "istio_tcp_received_bytes_total") == 15
    assert value(registry, "istio_tcp_connections_opened_total") == 1
    assert value(registry, "istio_tcp_connections_closed_total") == 0


def test_close_counts_once_with_the_final_flags() -> None:
    registry = CollectorRegistry()
    rec = ConnectionMetrics(registry).recorder(inbound_labels())
    rec.opened()
    rec.add_sent(3)
    rec.closed(ResponseFlags.DENY)
    rec.closed(ResponseFlags.NONE)  # ignored
    assert rec.is_closed
    assert value(registry, "istio_tcp_connections_closed_total", response_flags="DENY") == 1
    assert value(registry, "istio_tcp_connections_closed_total") == 1
    assert value(registry, "istio_tcp_connections_failed_total", response_flags="DENY") == 1
    # Byte counters keep the labels the connection opened with.
    assert value(registry, "istio_tcp_sent_bytes_total", response_flags="-") == 3


def test_clean_close_is_not_a_failure() -> None:
    registry = CollectorRegistry()
    rec = ConnectionMetrics(registry).recorder(inbound_labels())
    rec.opened()
    rec.closed()
    assert value(registry, "istio_tcp_connections_closed_total", response_flags="-") == 1
    assert value(registry, "istio_tcp_connections_failed_total") == 0


def test_connections_with_the_same_labels_share_series() -> None:
    registry = CollectorRegistry()
    metrics = ConnectionMetrics(registry)
    for _ in range(3):
        rec = metrics.recorder(inbound_labels())
        rec.opened()
        rec.add_sent(2)
        rec.closed()
    assert len(samples(registry)["istio_tcp_connections_opened_total"]) == 1
    assert value(registry, "istio_tcp_connections_opened_total") == 3
    assert value(registry, "istio_tcp_sent_bytes_total") == 6


def test_two_registries_do_not_collide() -> None:
    first, second = CollectorRegistry(), CollectorRegistry()
    ConnectionMetrics(first).recorder(inbound_labels()).opened()
    ConnectionMetrics(second)
    assert value(first, "istio_tcp_connections_opened_total") == 1
    assert value(second, "istio_tcp_connections_opened_total") == 0


def test_locality_labels_come_from_each_side_workload() -> None:
    client = replace(CLIENT, locality=Locality(region="eu", zone="eu-1a", subzone="rack1"))
    labels = ConnectionLabels.build(
        reporter=Reporter.SOURCE, source=client, destination=SERVER
    ).as_dict()
    assert labels["source_region"] == "eu" and labels["source_zone"] == "eu-1a"
    # the server sent no locality: unknown, as every missing value
    assert labels["destination_region"] == "unknown" and labels["destination_zone"] == "unknown"
