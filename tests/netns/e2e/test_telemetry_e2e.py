"""Connection telemetry of the real daemons, in both redirect modes: both sides' metrics and
access logs agree with what the client and the server exchanged, to the byte.

Istio's byte counters follow the request, whoever reports: ``istio_tcp_received_bytes_total``
counts client-to-server bytes and ``istio_tcp_sent_bytes_total`` server-to-client bytes, for
``reporter=source`` as for ``reporter=destination``. The access log's ``bytes_sent`` and
``bytes_recv`` are the reporting workload's own view, so they swap between the two sides. An
exchange whose two directions differ in size tells the orientations apart.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.netns.e2e.support import (
    NetnsServer,
    Scrape,
    access_records,
    any_address,
    exchange,
    finish_stream,
    host_part,
    hostport,
    log_mark,
    mesh_tag,
    mode_family_params,
    node_address,
    only_one,
    start_stream,
)
from tools.testbed import cgroup2_mount
from tools.testbed.mesh import ExtraService, Mesh, MeshOptions
from tools.testbed.plan import PodPlan
from ztunnel_py.testing.poll import wait_until
from ztunnel_py.testing.privileged import require

pytestmark = [pytest.mark.root]

ECHO = 9000  # the testbed app's echo port
UPLOAD = 7777  # a test server that answers a fixed size once the client half-closes
TELE = ExtraService("tele-n1", "10.96.0.102", ("pod-1-1",), ports={ECHO: ECHO, UPLOAD: UPLOAD})
CLIENT, SERVER = "pod-0-0", "pod-1-1"  # on node-0 and node-1
OPENED = "istio_tcp_connections_opened_total"
CLOSED = "istio_tcp_connections_closed_total"
FAILED = "istio_tcp_connections_failed_total"
RECEIVED = "istio_tcp_received_bytes_total"  # client -> server
SENT = "istio_tcp_sent_bytes_total"  # server -> client


@pytest.fixture(scope="module", params=mode_family_params())
def mesh(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Mesh]:
    require(cgroup2_mount() is not None, "a cgroup v2 mount (testbed pods live in cgroups)")
    redirect, family = request.param
    options = MeshOptions(
        tag=mesh_tag("tm", redirect, family),
        redirect=redirect,
        ip_family=family,
        services=(TELE,),
        env={"LOG_FORMAT": "json"},
    )
    shared = Mesh(options, Path(tmp_path_factory.mktemp(options.tag)))
    try:
        shared.up()
        yield shared
    finally:
        shared.down()


def mesh_labels(mesh: Mesh, reporter: str, client: PodPlan, server: PodPlan) -> dict[str, str]:
    """Every label of an mTLS connection from ``client`` to ``server`` through ``TELE``, as the
    testbed's local config describes the two workloads."""
    cluster = mesh.plan.cluster_id
    return {
        "reporter": reporter,
        "source_workload": client.app,
        "source_canonical_service": client.app,
        "source_canonical_revision": "latest",
        "source_workload_namespace": client.namespace,
        "source_principal": client.identity,
        "source_app": client.app,
        "source_version": "latest",
        "source_cluster": cluster,
        "destination_service": TELE.hostname,
        "destination_service_namespace": "default",
        "destination_service_name": TELE.name,
        "destination_workload": server.app,
        "destination_canonical_service": server.app,
        "destination_canonical_revision": "latest",
        "destination_workload_namespace": server.namespace,
        "destination_principal": server.identity,
        "destination_app": server.app,
        "destination_version": "latest",
        "destination_cluster": cluster,
        "request_protocol": "tcp",
        "response_flags": "-",
        "connection_security_policy": "mutual_tls",
        "source_region": "unknown",  # the testbed's workloads have no locality
        "source_zone": "unknown",
        "destination_region": "unknown",
        "destination_zone": "unknown",
    }


def access_line(
    mesh: Mesh, direction: str, client: PodPlan, server: PodPlan, port: int, sent: int, recv: int
) -> dict[str, Any]:
    """The access-log record of that connection, without its time, source port and duration."""
    cluster = mesh.plan.cluster_id
    return {
        "level": "info",
        "scope": "access",
        "message": "connection complete",
        "src.workload": client.name,
        "src.namespace": client.namespace,
        "src.identity": client.identity,
        "src.cluster": cluster,
        "dst.addr": hostport(server.ip, 15008),
        "dst.hbone_addr": hostport(server.ip, port),
        "dst.service": TELE.hostname,
        "dst.workload": server.name,
        "dst.namespace": server.namespace,
        "dst.identity": server.identity,
        "dst.cluster": cluster,
        "direction": direction,
        "bytes_sent": sent,
        "bytes_recv": recv,
    }


def without_variable_fields(record: dict[str, Any], client_ip: str) -> dict[str, Any]:
    assert record["src.addr"].startswith(host_part(client_ip)), record
    assert re.fullmatch(r"\d+ms", record["duration"]), record
    variable = {"time", "src.addr", "duration", "inbound", "outbound"}  # the span: a trace id
    return {k: v for k, v in record.items() if k not in variable}


def delta(before: Scrape, after: Scrape, name: str, labels: dict[str, str]) -> float:
    return after.exact(name, labels) - before.exact(name, labels)


@pytest.mark.parametrize(
    ("port", "toward", "back"),
    [(ECHO, 300_000, 300_000), (UPLOAD, 300_000, 70_000)],
    ids=["echo", "upload"],
)
def test_both_sides_count_and_log_the_exact_bytes(
    mesh: Mesh, port: int, toward: int, back: int
) -> None:
    client, server = mesh.pod(CLIENT), mesh.pod(SERVER)
    src_node, dst_node = mesh.daemons["node-0"], mesh.daemons["node-1"]
    with NetnsServer(server.netns_path, any_address(server.ip), UPLOAD, reply=back):
        marks = log_mark(src_node), log_mark(dst_node)
        before = Scrape(src_node), Scrape(dst_node)
        result = mesh.client(client.name, "echo", mesh.vip(TELE), port, "--bytes", str(toward))
        assert result["result"] == "ok", result
        assert (result["sent"], result["received"]) == (toward, back)

        # Each side logs the connection once, with bytes from its own workload's view.
        outbound = only_one(
            lambda: access_records(src_node, marks[0], direction="outbound"),
            "the source's access log",
        )
        inbound = only_one(
            lambda: access_records(dst_node, marks[1], direction="inbound"),
            "the destination's access log",
        )
    assert without_variable_fields(outbound, client.ip) == access_line(
        mesh, "outbound", client, server, port, sent=toward, recv=back
    )
    assert without_variable_fields(inbound, client.ip) == access_line(
        mesh, "inbound", client, server, port, sent=back, recv=toward
    )
    # Both daemons name the connection by the trace id the client's daemon sent.
    assert re.fullmatch(r"[0-9a-f]{32}", outbound["outbound"]["id"]), outbound
    assert inbound["inbound"]["id"] == outbound["outbound"]["id"]

    after = Scrape(src_node), Scrape(dst_node)
    for i, reporter in enumerate(("source", "destination")):
        labels = mesh_labels(mesh, reporter, client, server)
        assert delta(before[i], after[i], OPENED, labels) == 1, reporter
        assert delta(before[i], after[i], CLOSED, labels) == 1, reporter
        assert delta(before[i], after[i], RECEIVED, labels) == toward, reporter
        assert delta(before[i], after[i], SENT, labels) == back, reporter
        # Nothing else was counted: no other series moved, nothing failed.
        for name in (OPENED, CLOSED):
            moved = after[i].total(name, reporter=reporter) - before[i].total(
                name, reporter=reporter
            )
            assert moved == 1, (reporter, name)
        assert after[i].total(FAILED) == before[i].total(FAILED), reporter


def test_bytes_are_counted_while_the_connection_lives(mesh: Mesh) -> None:
    client, server = mesh.pod(CLIENT), mesh.pod(SERVER)
    src_node, dst_node = mesh.daemons["node-0"], mesh.daemons["node-1"]
    daemons = (src_node, dst_node)
    labels = [mesh_labels(mesh, r, client, server) for r in ("source", "destination")]
    marks = [log_mark(d) for d in daemons]
    before = [Scrape(d) for d in daemons]
    stream = start_stream(mesh, client.name, mesh.vip(TELE), ECHO)
    try:
        live: list[Scrape] = []

        def counted_both_ways() -> bool:
            live[:] = [Scrape(d) for d in daemons]
            return all(
                delta(before[i], live[i], name, labels[i]) > 0
                for i in (0, 1)
                for name in (RECEIVED, SENT)
            )

        wait_until(counted_both_ways, "bytes of the running stream in both daemons' metrics")
        assert stream.poll() is None  # the connection is still open ...
        for i in (0, 1):
            assert delta(before[i], live[i], OPENED, labels[i]) == 1
            assert delta(before[i], live[i], CLOSED, labels[i]) == 0  # ... and counted as such
        assert access_records(src_node, marks[0]) == access_records(dst_node, marks[1]) == []

        result = finish_stream(stream)
    finally:
        if stream.poll() is None:
            stream.kill()
            stream.communicate()
    assert result["result"] == "ok", result
    assert result["sent"] == result["received"] > 0
    assert result["sha256"] == result["expected_sha256"]

    records = [
        only_one(lambda: access_records(src_node, marks[0]), "the source's access log"),
        only_one(lambda: access_records(dst_node, marks[1]), "the destination's access log"),
    ]
    after = [Scrape(d) for d in daemons]
    for i in (0, 1):
        assert delta(before[i], after[i], CLOSED, labels[i]) == 1
        # The totals at the close are exactly what went through: live counts taken once.
        assert delta(before[i], after[i], RECEIVED, labels[i]) == result["sent"]
        assert delta(before[i], after[i], SENT, labels[i]) == result["received"]
    assert (records[0]["bytes_sent"], records[0]["bytes_recv"]) == (
        result["sent"],
        result["received"],
    )
    assert (records[1]["bytes_sent"], records[1]["bytes_recv"]) == (
        result["received"],
        result["sent"],
    )


def test_plaintext_from_outside_the_mesh_is_counted_without_identities(mesh: Mesh) -> None:
    server = mesh.pod(SERVER)
    node = mesh.plan.node(server.node)
    daemon = mesh.daemons[server.node]
    payload = bytes(range(256)) * 100
    mark = log_mark(daemon)
    before = Scrape(daemon)

    outcome = exchange(f"/run/netns/{node.netns}", server.ip, ECHO, payload)
    assert outcome == ("ok", payload)

    record = only_one(lambda: access_records(daemon, mark), "the destination's access log")
    assert record["src.addr"].startswith(host_part(node_address(mesh, node.name, server.ip)))
    assert record["dst.addr"] == hostport(server.ip, ECHO)
    assert record["direction"] == "inbound"
    assert (record["bytes_sent"], record["bytes_recv"]) == (len(payload), len(payload))
    assert "src.identity" not in record and "dst.identity" not in record
    assert "src.workload" not in record  # the node is no workload

    after = Scrape(daemon)
    plain = {
        "reporter": "destination",
        "source_workload": "unknown",
        "source_principal": "unknown",
        "destination_workload": server.app,
        "destination_principal": server.identity,  # its own, as ztunnel labels it
        "connection_security_policy": "unknown",
        "response_flags": "-",
    }

    def moved(name: str) -> float:
        return after.total(name, **plain) - before.total(name, **plain)

    assert (moved(OPENED), moved(CLOSED)) == (1, 1)
    assert moved(RECEIVED) == moved(SENT) == len(payload)
