"""ProxyTelemetry: live byte counting, flags, both reporters' orientation, access log lines."""

from __future__ import annotations

import asyncio
import io
import ipaddress
import json
import logging
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from ztunnel_py.proxy.conntrack import POLICY_CHANGE_ERROR
from ztunnel_py.proxy.reporting import report_splice
from ztunnel_py.proxy.splice import SpliceResult
from ztunnel_py.state.model import Service, Workload
from ztunnel_py.state.store import ProxyState, UpdateBatch
from ztunnel_py.telemetry import logging as ztlogging
from ztunnel_py.telemetry.connections import ConnectionRecord, Direction, NoTelemetry
from ztunnel_py.telemetry.metrics import (
    ConnectionLabels,
    ConnectionMetrics,
    Reporter,
    ResponseFlags,
    SecurityPolicy,
)
from ztunnel_py.telemetry.sink import ProxyTelemetry

ip = ipaddress.ip_address
CLIENT = Workload(
    uid="Kubernetes//Pod/client-ns/sleep-abc",
    name="sleep-abc",
    namespace="client-ns",
    workload_ips=(ip("10.0.0.1"),),
    service_account="sleep",
    canonical_name="sleep",
    canonical_revision="v1",
    workload_name="sleep",
)
SERVER = Workload(
    uid="Kubernetes//Pod/server-ns/httpbin-xyz",
    name="httpbin-xyz",
    namespace="server-ns",
    workload_ips=(ip("10.0.0.2"),),
    service_account="httpbin",
    canonical_name="httpbin",
    canonical_revision="v2",
    workload_name="httpbin",
    services={"server-ns/httpbin.server-ns.svc.cluster.local": {80: 8080}},
)
SERVICE = Service(
    name="httpbin",
    namespace="server-ns",
    hostname="httpbin.server-ns.svc.cluster.local",
    ports={80: 8080},
)
CLIENT_ID = "spiffe://cluster.local/ns/client-ns/sa/sleep"
SERVER_ID = "spiffe://cluster.local/ns/server-ns/sa/httpbin"

OUTBOUND = ConnectionRecord(
    direction=Direction.OUTBOUND,
    src=(ip("10.0.0.1"), 40000),
    dst=(ip("10.96.0.10"), 80),
    src_identity=CLIENT_ID,
    dst_identity=SERVER_ID,
    src_workload=CLIENT,
    dst_workload=SERVER,
    dst_service=SERVICE.hostname,
    dst_addr=(ip("10.0.0.2"), 15008),
    hbone_addr="10.0.0.2:8080",
)
INBOUND = ConnectionRecord(
    direction=Direction.INBOUND,
    src=(ip("10.0.0.1"), 40001),
    dst=(ip("10.0.0.2"), 8080),
    src_identity=CLIENT_ID,
    dst_identity=SERVER_ID,
    dst_workload=SERVER,
    dst_service=SERVICE.hostname,
    dst_addr=(ip("10.0.0.2"), 15008),
    hbone_addr="10.0.0.2:8080",
)
PLAINTEXT = ConnectionRecord(
    direction=Direction.INBOUND,
    src=(ip("10.0.0.1"), 40002),
    dst=(ip("10.0.0.2"), 8080),
    src_identity="spiffe://forged/ns/x/sa/y",  # never a principal without mTLS
    dst_identity=SERVER_ID,
    dst_workload=SERVER,
    protocol="TCP",
)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Counters:
    """A fake splice's live counters: (toward the destination, back to the source)."""

    def __init__(self) -> None:
        self.toward = 0
        self.back = 0
        self.reads = 0

    def __call__(self) -> tuple[int, int]:
        self.reads += 1
        return self.toward, self.back


class Harness:
    def __init__(self, *, access_log_errors_only: bool = False) -> None:
        self.registry = CollectorRegistry()
        self.state = ProxyState()
        self.state.apply(UpdateBatch(workloads=(CLIENT, SERVER), services=(SERVICE,)))
        self.clock = Clock()
        self.sink = ProxyTelemetry(
            ConnectionMetrics(self.registry),
            self.state,
            clock=self.clock,
            access_log_errors_only=access_log_errors_only,
        )

    def value(self, name: str, **labels: str) -> float:
        """Sum of the samples of ``name`` whose labels include ``labels``."""
        total = 0.0
        for family in self.registry.collect():
            for s in family.samples:
                if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                    total += s.value
        return total

    def up(self, reporter: str) -> float:  # client -> server, whoever reports
        return self.value("istio_tcp_received_bytes_total", reporter=reporter)

    def down(self, reporter: str) -> float:  # server -> client
        return self.value("istio_tcp_sent_bytes_total", reporter=reporter)


@pytest.fixture
def h() -> Harness:
    return Harness()


Capture = Callable[[bool], io.StringIO]


@pytest.fixture
def capture() -> Iterator[Capture]:
    """The project's log handler on a buffer; the logging setup is restored afterwards."""
    root = logging.getLogger()
    saved_handlers, saved_level = list(root.handlers), root.level
    saved_levels = {n: logging.getLogger(n).level for n in ("access", "ztunnel_py")}

    def install(json_format: bool) -> io.StringIO:
        buffer = io.StringIO()
        ztlogging.configure("info", json_format=json_format, stream=buffer)
        return buffer

    yield install
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in saved_handlers:
        root.addHandler(handler)
    root.setLevel(saved_level)
    for name, level in saved_levels.items():
        logging.getLogger(name).setLevel(level)


def json_lines(out: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.getvalue().splitlines()]


# ---------------------------------------------------------------------------- live bytes


def test_outbound_bytes_count_while_the_connection_lives(h: Harness) -> None:
    counters = Counters()
    h.sink.connection_opened(OUTBOUND, counters)
    assert h.value("istio_tcp_connections_opened_total", reporter="source") == 1
    counters.toward, counters.back = 1000, 0
    h.sink.flush()
    assert (h.up("source"), h.down("source")) == (1000, 0)
    counters.toward, counters.back = 1500, 700
    h.sink.flush()
    h.sink.flush()  # nothing new: nothing added twice
    assert (h.up("source"), h.down("source")) == (1500, 700)
    assert h.value("istio_tcp_connections_closed_total") == 0
    h.sink.connection_closed(OUTBOUND, bytes_sent=2000, bytes_received=900, error=None)
    assert (h.up("source"), h.down("source")) == (2000, 900)
    assert h.value("istio_tcp_connections_closed_total", response_flags="-") == 1
    assert h.value("istio_tcp_connections_failed_total") == 0
    assert h.sink.live_connections() == []


def test_inbound_orientation_matches_the_source_reporter(h: Harness) -> None:
    """Both reporters put client->server bytes in received, server->client in sent."""
    counters = Counters()
    h.sink.connection_opened(INBOUND, counters)
    counters.toward, counters.back = 300, 50
    h.sink.flush()
    assert (h.up("destination"), h.down("destination")) == (300, 50)
    h.sink.connection_closed(INBOUND, bytes_sent=320, bytes_received=60, error=None)
    assert (h.up("destination"), h.down("destination")) == (320, 60)


def test_flush_reads_only_live_connections(h: Harness) -> None:
    first, second = Counters(), Counters()
    h.sink.connection_opened(OUTBOUND, first)
    h.sink.connection_opened(INBOUND, second)
    assert h.sink.live_connections() == [OUTBOUND, INBOUND]
    h.sink.connection_closed(OUTBOUND, bytes_sent=1, bytes_received=1, error=None)
    first.reads = second.reads = 0
    h.sink.flush()
    assert (first.reads, second.reads) == (0, 1)
    assert h.sink.live_connections() == [INBOUND]


def test_no_growth_after_many_connections(h: Harness) -> None:
    for port in range(1000):
        record = ConnectionRecord(
            direction=Direction.INBOUND,
            src=(ip("10.0.0.1"), 20000 + port),
            dst=(ip("10.0.0.2"), 8080),
            dst_workload=SERVER,
        )
        h.sink.connection_opened(record, Counters())
        h.sink.connection_closed(record, bytes_sent=1, bytes_received=2, error=None)
    assert h.sink.live_connections() == []
    assert h.value("istio_tcp_connections_opened_total") == 1000
    assert (h.up("destination"), h.down("destination")) == (1000, 2000)


def test_close_without_open_still_counts_both(h: Harness) -> None:
    h.sink.connection_closed(OUTBOUND, bytes_sent=5, bytes_received=6, error=None)
    assert h.value("istio_tcp_connections_opened_total") == 1
    assert h.value("istio_tcp_connections_closed_total") == 1
    assert (h.up("source"), h.down("source")) == (5, 6)


# ---------------------------------------------------------------------------- labels


def test_inbound_labels_from_state_and_verified_identity(h: Harness) -> None:
    h.sink.connection_opened(INBOUND, Counters())
    expected = ConnectionLabels.build(
        reporter=Reporter.DESTINATION,
        source=CLIENT,  # found by source IP
        source_identity=CLIENT_ID,
        destination=SERVER,
        destination_service=SERVICE,
        destination_identity=SERVER_ID,
        security_policy=SecurityPolicy.MUTUAL_TLS,
    ).as_dict()
    assert expected["source_workload"] == "sleep"
    assert expected["destination_service_name"] == "httpbin"
    value = h.registry.get_sample_value("istio_tcp_connections_opened_total", expected)
    assert value == 1


def test_inbound_service_guessed_from_the_target_port(h: Harness) -> None:
    record = ConnectionRecord(
        direction=Direction.INBOUND,
        src=(ip("10.0.0.1"), 1),
        dst=(ip("10.0.0.2"), 8080),
        dst_workload=SERVER,
        dst_service="not-a-service-of-this-pod.example.com",
    )
    h.sink.connection_opened(record)
    assert h.value("istio_tcp_connections_opened_total", destination_service_name="httpbin") == 1


def test_plain_tcp_has_no_principals_and_unknown_security(h: Harness) -> None:
    h.sink.connection_opened(PLAINTEXT, Counters())
    assert (
        h.value(
            "istio_tcp_connections_opened_total",
            connection_security_policy="unknown",
            source_principal="unknown",
            source_workload="sleep",
        )
        == 1
    )


def test_outbound_labels(h: Harness) -> None:
    h.sink.connection_opened(OUTBOUND, Counters())
    assert (
        h.value(
            "istio_tcp_connections_opened_total",
            reporter="source",
            source_principal=CLIENT_ID,
            destination_principal=SERVER_ID,
            destination_service="httpbin.server-ns.svc.cluster.local",
            destination_workload="httpbin",
            connection_security_policy="mutual_tls",
        )
        == 1
    )


# ---------------------------------------------------------------------------- flags


def test_error_close_without_flags_is_connect(h: Harness) -> None:
    h.sink.connection_opened(OUTBOUND, Counters())
    h.sink.connection_closed(
        OUTBOUND, bytes_sent=10, bytes_received=0, error="connection reset by peer"
    )
    assert h.value("istio_tcp_connections_closed_total", response_flags="CONNECT") == 1
    assert h.value("istio_tcp_connections_failed_total", response_flags="CONNECT") == 1
    assert h.value("istio_tcp_received_bytes_total", response_flags="-") == 10


def test_policy_change_close_is_deny(h: Harness) -> None:
    h.sink.connection_opened(INBOUND, Counters())
    h.sink.connection_closed(
        INBOUND,
        bytes_sent=1,
        bytes_received=1,
        error=POLICY_CHANGE_ERROR,
        flags=ResponseFlags.DENY,
    )
    assert h.value("istio_tcp_connections_closed_total", response_flags="DENY") == 1
    assert h.value("istio_tcp_connections_failed_total", response_flags="DENY") == 1


def test_failed_connection_is_opened_closed_and_failed_at_once(h: Harness) -> None:
    h.sink.connection_failed(INBOUND, error="denied", flags=ResponseFlags.DENY)
    assert h.value("istio_tcp_connections_opened_total", response_flags="-") == 1
    assert h.value("istio_tcp_connections_closed_total", response_flags="DENY") == 1
    assert h.value("istio_tcp_connections_failed_total", response_flags="DENY") == 1
    assert h.up("destination") == h.down("destination") == 0
    assert h.sink.live_connections() == []


def test_failure_of_a_live_connection_keeps_its_bytes(h: Harness) -> None:
    counters = Counters()
    h.sink.connection_opened(OUTBOUND, counters)
    counters.toward = 42
    h.sink.connection_failed(OUTBOUND, error="tls error: x", flags=ResponseFlags.TLS_FAILURE)
    assert h.value("istio_tcp_connections_opened_total") == 1
    assert h.value("istio_tcp_connections_failed_total", response_flags="TLS_FAILURE") == 1
    assert h.up("source") == 42
    assert h.sink.live_connections() == []


# ---------------------------------------------------------------------------- access log


def test_access_log_bytes_per_reporter_json(h: Harness, capture: Capture) -> None:
    out = capture(True)
    h.sink.connection_opened(OUTBOUND, Counters())
    h.sink.connection_opened(INBOUND, Counters())
    h.clock.now += 1.5
    h.sink.connection_closed(OUTBOUND, bytes_sent=2000, bytes_received=900, error=None)
    h.sink.connection_closed(INBOUND, bytes_sent=2000, bytes_received=900, error=None)
    outbound, inbound = json_lines(out)
    assert outbound == {
        "level": "info",
        "time": outbound["time"],
        "scope": "access",
        "message": "connection complete",
        "src.addr": "10.0.0.1:40000",
        "src.workload": "sleep-abc",
        "src.namespace": "client-ns",
        "src.identity": CLIENT_ID,
        "src.cluster": "Kubernetes",
        "dst.addr": "10.0.0.2:15008",
        "dst.hbone_addr": "10.0.0.2:8080",
        "dst.service": "httpbin.server-ns.svc.cluster.local",
        "dst.workload": "httpbin-xyz",
        "dst.namespace": "server-ns",
        "dst.identity": SERVER_ID,
        "dst.cluster": "Kubernetes",
        "direction": "outbound",
        "bytes_sent": 2000,
        "bytes_recv": 900,
        "duration": "1500ms",
    }
    # The server received what the client sent: the log is the workload's view, not flipped.
    assert inbound["direction"] == "inbound"
    assert (inbound["bytes_sent"], inbound["bytes_recv"]) == (900, 2000)
    assert inbound["src.workload"] == "sleep-abc"  # looked up by source IP


def test_access_log_failure_text(h: Harness, capture: Capture) -> None:
    out = capture(False)
    h.sink.connection_failed(
        INBOUND,
        error="connection closed due to policy rejection: denied",
        flags=ResponseFlags.DENY,
    )
    line = out.getvalue().strip()
    assert " ERROR access: connection complete src.addr=10.0.0.1:40001 " in line
    assert " direction=inbound bytes_sent=0 bytes_recv=0 duration=0ms " in line
    assert line.endswith('error="connection closed due to policy rejection: denied"')


def test_plaintext_log_has_no_identities(h: Harness, capture: Capture) -> None:
    out = capture(True)
    h.sink.connection_opened(PLAINTEXT)
    h.sink.connection_closed(PLAINTEXT, bytes_sent=3, bytes_received=4, error=None)
    (line,) = json_lines(out)
    assert "src.identity" not in line and "dst.identity" not in line
    assert line["dst.addr"] == "10.0.0.2:8080"
    assert (line["bytes_sent"], line["bytes_recv"]) == (4, 3)


def test_rejection_logs_connection_failed(h: Harness, capture: Capture) -> None:
    out = capture(False)
    h.sink.connection_rejected(
        direction=Direction.OUTBOUND,
        src=(ip("10.0.0.1"), 5),
        dst=(ip("fd00::9"), 80),
        error="no healthy upstream",
    )
    line = out.getvalue().strip()
    assert " WARN  access: connection failed " in line
    assert line.endswith(
        'src.addr=10.0.0.1:5 dst.addr=[fd00::9]:80 direction=outbound error="no healthy upstream"'
    )
    assert h.value("istio_tcp_connections_opened_total") == 0


# ---------------------------------------------------------------------------- errors only


def test_errors_only_keeps_failures_denials_and_rejections(capture: Capture) -> None:
    h = Harness(access_log_errors_only=True)
    out = capture(True)
    logging.getLogger("access").setLevel(logging.DEBUG)  # not even the "opened" lines
    h.sink.connection_opened(OUTBOUND, Counters())
    h.sink.connection_closed(OUTBOUND, bytes_sent=5, bytes_received=6, error=None)  # clean
    h.sink.connection_opened(INBOUND, Counters())
    h.sink.connection_closed(
        INBOUND, bytes_sent=1, bytes_received=1, error=POLICY_CHANGE_ERROR, flags=ResponseFlags.DENY
    )
    h.sink.connection_failed(PLAINTEXT, error="denied", flags=ResponseFlags.DENY)
    h.sink.connection_rejected(
        direction=Direction.OUTBOUND, src=(ip("10.0.0.1"), 5), dst=(ip("10.9.9.9"), 80), error="x"
    )
    lines = json_lines(out)
    assert [(r["message"], r["level"]) for r in lines] == [
        ("connection complete", "error"),
        ("connection complete", "error"),
        ("connection failed", "warn"),
    ]
    assert [r["error"] for r in lines] == [POLICY_CHANGE_ERROR, "denied", "x"]
    # Metrics still count every connection, the clean one included.
    assert h.value("istio_tcp_connections_opened_total") == 3
    assert h.value("istio_tcp_connections_closed_total", response_flags="-") == 1


def test_without_the_filter_clean_connections_are_logged(h: Harness, capture: Capture) -> None:
    out = capture(True)
    h.sink.connection_opened(OUTBOUND, Counters())
    h.sink.connection_closed(OUTBOUND, bytes_sent=5, bytes_received=6, error=None)
    (line,) = json_lines(out)
    assert (line["message"], line["level"]) == ("connection complete", "info")


# ---------------------------------------------------------------------------- report_splice


class FakeSplice:
    def __init__(self) -> None:
        self.bytes_in = 0
        self.bytes_out = 0
        self.done: asyncio.Future[SpliceResult] = asyncio.get_running_loop().create_future()


@pytest.mark.asyncio
@pytest.mark.parametrize("reads_source", [True, False])
async def test_report_splice_orients_bytes_and_reports_the_close(reads_source: bool) -> None:
    h = Harness()
    record = OUTBOUND if reads_source else INBOUND
    reporter = "source" if reads_source else "destination"
    splice = FakeSplice()
    report_splice(h.sink, record, splice, reads_source=reads_source)
    # bytes_in is what the splice read from its TCP side: the client outbound, the app inbound.
    splice.bytes_in, splice.bytes_out = 10, 20
    h.sink.flush()
    up, down = (10, 20) if reads_source else (20, 10)
    assert (h.up(reporter), h.down(reporter)) == (up, down)
    splice.done.set_result(SpliceResult(11, 22, POLICY_CHANGE_ERROR))
    await asyncio.sleep(0)  # done callbacks run on the next loop iteration
    up, down = (11, 22) if reads_source else (22, 11)
    assert (h.up(reporter), h.down(reporter)) == (up, down)
    assert h.value("istio_tcp_connections_closed_total", response_flags="DENY") == 1
    assert h.sink.live_connections() == []


@pytest.mark.asyncio
async def test_report_splice_clean_close_and_no_telemetry() -> None:
    h = Harness()
    splice = FakeSplice()
    report_splice(h.sink, OUTBOUND, splice, reads_source=True)
    report_splice(NoTelemetry(), OUTBOUND, splice, reads_source=True)
    splice.done.set_result(SpliceResult(1, 2, None))
    await asyncio.sleep(0)
    assert h.value("istio_tcp_connections_closed_total", response_flags="-") == 1


def test_sockets_open_counts_live_connections_per_reporter(h: Harness) -> None:
    h.sink.connection_opened(OUTBOUND, Counters())
    h.sink.flush()
    assert h.value("istio_tcp_sockets_open", reporter="source") == 1
    assert h.value("istio_tcp_sockets_open", reporter="destination") == 0
    h.sink.connection_closed(OUTBOUND, bytes_sent=0, bytes_received=0, error=None)
    h.sink.flush()
    assert h.value("istio_tcp_sockets_open", reporter="source") == 0


def test_dump_lists_live_connections_with_their_bytes_and_age(h: Harness) -> None:
    counters = Counters()
    h.sink.connection_opened(OUTBOUND, counters)
    counters.toward, counters.back = 300, 20
    h.clock.now += 2.5
    (entry,) = h.sink.dump()
    assert entry == {
        "direction": "outbound",
        "src": "10.0.0.1:40000",
        "dst": "10.0.0.2:15008",
        "protocol": "HBONE",
        "srcIdentity": CLIENT_ID,
        "dstIdentity": SERVER_ID,
        "bytesTowardDestination": 300,
        "bytesBackToSource": 20,
        "ageSeconds": 2.5,
    }
    h.sink.connection_closed(OUTBOUND, bytes_sent=300, bytes_received=20, error=None)
    assert h.sink.dump() == []
