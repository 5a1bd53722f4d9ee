"""Access log lines in ztunnel's shape, rendered by the project's text and JSON formatters."""

from __future__ import annotations

import io
import ipaddress
import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import replace

import pytest

from ztunnel_py.hbone.headers import format_authority
from ztunnel_py.rbac.evaluate import ConnectionInfo, evaluate, log_decision
from ztunnel_py.rbac.model import Action, Authorization
from ztunnel_py.state.model import Service, Workload
from ztunnel_py.telemetry import logging as ztlogging
from ztunnel_py.telemetry.access_log import (
    AccessLogContext,
    duration_text,
    log_connection_complete,
    log_connection_failed,
    log_connection_opened,
)
from ztunnel_py.telemetry.metrics import ConnectionLabels, Reporter, SecurityPolicy

CLIENT = Workload(uid="c", name="sleep-abc", namespace="client-ns", service_account="sleep")
SERVER = Workload(
    uid="s",
    name="httpbin-xyz",
    namespace="server-ns",
    service_account="httpbin",
    canonical_name="httpbin",
)
SERVICE = Service(
    name="httpbin", namespace="server-ns", hostname="httpbin.server-ns.svc.cluster.local"
)
CLIENT_ID = "spiffe://cluster.local/ns/client-ns/sa/sleep"
SERVER_ID = "spiffe://cluster.local/ns/server-ns/sa/httpbin"

Capture = Callable[[bool], io.StringIO]


@pytest.fixture
def capture() -> Iterator[Capture]:
    """Install the project's log handler on a buffer; restore the logging setup afterwards."""
    root = logging.getLogger()
    saved_handlers, saved_level = list(root.handlers), root.level
    touched = ["access", "ztunnel_py", "ztunnel_py.rbac"]
    saved_levels = {name: logging.getLogger(name).level for name in touched}

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


def inbound_context(*, mtls: bool = True) -> AccessLogContext:
    labels = ConnectionLabels.build(
        reporter=Reporter.DESTINATION,
        source=CLIENT,
        source_identity=CLIENT_ID if mtls else None,
        destination=SERVER,
        destination_service=SERVICE,
        security_policy=SecurityPolicy.MUTUAL_TLS if mtls else SecurityPolicy.UNKNOWN,
    )
    return AccessLogContext.build(
        labels,
        src_addr=format_authority(ipaddress.ip_address("10.0.0.1"), 40000),
        dst_addr=format_authority(ipaddress.ip_address("10.0.0.2"), 8080),
        hbone_addr="10.0.0.2:8080" if mtls else None,
        source=CLIENT,
        destination=SERVER,
    )


EXPECTED_MTLS_FIELDS = {
    "src.addr": "10.0.0.1:40000",
    "src.workload": "sleep-abc",
    "src.namespace": "client-ns",
    "src.identity": CLIENT_ID,
    "src.cluster": "Kubernetes",
    "dst.addr": "10.0.0.2:8080",
    "dst.hbone_addr": "10.0.0.2:8080",
    "dst.service": "httpbin.server-ns.svc.cluster.local",
    "dst.workload": "httpbin-xyz",
    "dst.namespace": "server-ns",
    "dst.identity": SERVER_ID,
    "dst.cluster": "Kubernetes",
    "direction": "inbound",
    "bytes_sent": 512,
    "bytes_recv": 64,
    "duration": "1234ms",
}


def test_complete_json_has_ztunnels_fields(capture: Capture) -> None:
    out = capture(True)
    log_connection_complete(inbound_context(), bytes_sent=512, bytes_recv=64, duration=1.2345)
    record = json.loads(out.getvalue())
    assert record["scope"] == "access"
    assert record["level"] == "info"
    assert record["message"] == "connection complete"
    fields = {k: v for k, v in record.items() if k not in {"scope", "level", "message", "time"}}
    assert fields == EXPECTED_MTLS_FIELDS
    assert list(fields) == list(EXPECTED_MTLS_FIELDS)  # ztunnel's order


def test_complete_text_renders_key_values_in_order(capture: Capture) -> None:
    out = capture(False)
    log_connection_complete(inbound_context(), bytes_sent=512, bytes_recv=64, duration=1.2345)
    line = out.getvalue().strip()
    assert " INFO  access: connection complete " in line
    expected = " ".join(f"{k}={v}" for k, v in EXPECTED_MTLS_FIELDS.items())
    assert line.endswith(expected)


TRACE_ID = 0x4BF92F3577B34DA6A3CE929D0E0E4736


def test_trace_id_is_the_span_of_the_line_json(capture: Capture) -> None:
    out = capture(True)
    ctx = replace(inbound_context(), trace_id=TRACE_ID)
    log_connection_complete(ctx, bytes_sent=1, bytes_recv=2, duration=0.0)
    record = json.loads(out.getvalue())
    # ztunnel's JSON puts the span's fields under its name.
    assert record["inbound"] == {"id": "4bf92f3577b34da6a3ce929d0e0e4736", "peer": "10.0.0.1:40000"}
    assert record["src.addr"] == "10.0.0.1:40000"


def test_trace_id_is_the_span_of_the_line_text(capture: Capture) -> None:
    out = capture(False)
    ctx = replace(inbound_context(), trace_id=TRACE_ID)
    log_connection_complete(ctx, bytes_sent=1, bytes_recv=2, duration=0.0)
    line = out.getvalue().strip()
    assert (
        " access:inbound{id=4bf92f3577b34da6a3ce929d0e0e4736 peer=10.0.0.1:40000}:"
        " connection complete " in line
    )


def test_outbound_span_has_only_the_id_and_no_trace_means_no_span(capture: Capture) -> None:
    out = capture(True)
    labels = ConnectionLabels.build(reporter=Reporter.SOURCE, source=CLIENT, destination=SERVER)
    outbound = AccessLogContext.build(
        labels, src_addr="10.0.0.1:40000", dst_addr="10.0.0.2:15008", trace_id=1
    )
    log_connection_complete(outbound, bytes_sent=1, bytes_recv=2, duration=0.0)
    log_connection_complete(inbound_context(), bytes_sent=1, bytes_recv=2, duration=0.0)
    first, second = (json.loads(line) for line in out.getvalue().splitlines())
    assert first["outbound"] == {"id": "0" * 31 + "1"}
    assert "inbound" not in second and "outbound" not in second


def test_failure_is_an_error_line_with_the_error(capture: Capture) -> None:
    out = capture(True)
    log_connection_complete(
        inbound_context(),
        bytes_sent=0,
        bytes_recv=0,
        duration=0.0049,
        error="connection closed due to policy change",
    )
    record = json.loads(out.getvalue())
    assert record["level"] == "error"
    assert record["message"] == "connection complete"
    assert record["error"] == "connection closed due to policy change"
    assert record["duration"] == "4ms"


def test_failure_text_quotes_the_error(capture: Capture) -> None:
    out = capture(False)
    log_connection_complete(
        inbound_context(), bytes_sent=0, bytes_recv=0, duration=0, error="policy rejection"
    )
    line = out.getvalue().strip()
    assert " ERROR access: connection complete " in line
    assert line.endswith('error="policy rejection"')


def test_identities_only_with_mtls_and_missing_fields_dropped(capture: Capture) -> None:
    out = capture(True)
    log_connection_complete(inbound_context(mtls=False), bytes_sent=1, bytes_recv=2, duration=0)
    record = json.loads(out.getvalue())
    assert "src.identity" not in record
    assert "dst.identity" not in record
    assert "dst.hbone_addr" not in record
    assert record["direction"] == "inbound"


def test_workload_name_falls_back_to_canonical_service(capture: Capture) -> None:
    labels = ConnectionLabels.build(reporter=Reporter.SOURCE, destination=SERVER)
    ctx = AccessLogContext.build(labels, src_addr="10.0.0.1:1", dst_addr="10.0.0.2:15008")
    assert ctx.dst_workload == "httpbin"  # no Workload passed: its canonical name
    assert "src.workload" not in ctx.fields()  # nothing known at all: left out
    assert ctx.fields()["direction"] == "outbound"


def test_early_reject_is_connection_failed(capture: Capture) -> None:
    out = capture(False)
    log_connection_failed(
        src_addr="[fd00::1]:5000",
        dst_addr="[fd00::2]:15008",
        reporter=Reporter.DESTINATION,
        error="unknown source",
    )
    line = out.getvalue().strip()
    assert " WARN  access: connection failed " in line
    assert line.endswith(
        'src.addr=[fd00::1]:5000 dst.addr=[fd00::2]:15008 direction=inbound error="unknown source"'
    )


def test_opened_is_debug_only(capture: Capture) -> None:
    out = capture(False)
    log_connection_opened(inbound_context())
    assert out.getvalue() == ""
    logging.getLogger("access").setLevel(logging.DEBUG)
    log_connection_opened(inbound_context())
    assert "DEBUG access: connection opened src.addr=10.0.0.1:40000" in out.getvalue()


def test_helpers() -> None:
    assert format_authority(ipaddress.ip_address("fd00::1"), 80) == "[fd00::1]:80"
    assert format_authority(ipaddress.ip_address("10.0.0.1"), 80) == "10.0.0.1:80"
    assert duration_text(0.0999) == "99ms"
    assert duration_text(-1) == "0ms"


# --- AUTHZ_POLICY_INFO_LOGGING ----------------------------------------------------------------

CONN = ConnectionInfo(
    src_ip=ipaddress.ip_address("10.0.0.1"),
    src_port=40000,
    dst_ip=ipaddress.ip_address("10.0.0.2"),
    dst_port=8080,
)
DENY_ALL = Authorization(name="deny-all", namespace="ns1", action=Action.DENY, rules=((),))
DRY_DENY = Authorization(name="dry", namespace="ns1", action=Action.DENY, rules=((),), dry_run=True)


@pytest.mark.parametrize("json_format", [False, True], ids=["text", "json"])
def test_decision_logged_at_info_with_the_flag(capture: Capture, json_format: bool) -> None:
    out = capture(json_format)
    logger = logging.getLogger("ztunnel_py.rbac")
    log_decision(logger, evaluate(CONN, [DENY_ALL]), CONN, info_level=True)
    text = out.getvalue()
    assert "denied by policy ns1/deny-all" in text
    if json_format:
        record = json.loads(text)
        assert (record["level"], record["policy"], record["allowed"]) == (
            "info",
            "ns1/deny-all",
            False,
        )
    else:
        assert " INFO  ztunnel_py.rbac: denied by policy ns1/deny-all " in text
        assert "policy=ns1/deny-all" in text


def test_decision_logged_at_debug_without_the_flag(capture: Capture) -> None:
    out = capture(False)
    logger = logging.getLogger("ztunnel_py.rbac")
    log_decision(logger, evaluate(CONN, [DENY_ALL]), CONN, info_level=False)
    assert out.getvalue() == ""  # debug is below the configured info level
    logger.setLevel(logging.DEBUG)
    log_decision(logger, evaluate(CONN, [DENY_ALL]), CONN, info_level=False)
    assert " DEBUG ztunnel_py.rbac: denied by policy ns1/deny-all " in out.getvalue()


def test_dry_run_matches_are_logged_by_name(capture: Capture) -> None:
    out = capture(False)
    log_decision(
        logging.getLogger("ztunnel_py.rbac"), evaluate(CONN, [DRY_DENY]), CONN, info_level=True
    )
    lines = out.getvalue().splitlines()
    assert "dry-run: policy match policy=ns1/dry" in lines[0]
    assert "allowed: no ALLOW policies apply" in lines[1]
    assert "dry_run_denied=True" in lines[1]
