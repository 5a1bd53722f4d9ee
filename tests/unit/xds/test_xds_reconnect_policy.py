"""ztunnel's reconnect policy: which stream ends reconnect at once and which back off."""

from __future__ import annotations

import grpc
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from ztunnel_py.xds.client import (
    INITIAL_BACKOFF_S,
    MAX_BACKOFF_S,
    TerminationReason,
    XdsMetrics,
    classify,
    next_backoff,
)
from ztunnel_py.xds.delta import DeltaDiscoveryResponse
from ztunnel_py.xds.handlers import ADDRESS_TYPE

R = TerminationReason


@pytest.mark.parametrize(
    ("code", "details", "got_response", "reason"),
    [
        (grpc.StatusCode.UNKNOWN, "", True, R.RECONNECT),
        (grpc.StatusCode.CANCELLED, "", False, R.RECONNECT),
        (grpc.StatusCode.DEADLINE_EXCEEDED, "", True, R.RECONNECT),
        (grpc.StatusCode.UNAVAILABLE, "received prior goaway: code: NO_ERROR", True, R.RECONNECT),
        (grpc.StatusCode.UNAVAILABLE, "transport is closing", False, R.RECONNECT),
        (
            grpc.StatusCode.UNAVAILABLE,
            "failed to connect to all addresses",
            False,
            R.CONNECTION_ERROR,
        ),
        (grpc.StatusCode.UNAVAILABLE, "Socket closed", True, R.ERROR),
        (grpc.StatusCode.PERMISSION_DENIED, "authorization failed", False, R.ERROR),
        (grpc.StatusCode.INTERNAL, "boom", True, R.ERROR),
    ],
)
def test_classify(code: grpc.StatusCode, details: str, got_response: bool, reason: R) -> None:
    assert classify(code, details, got_response=got_response) is reason


def test_backoff_doubles_to_fifteen_seconds_and_resets_on_reconnect() -> None:
    delays = []
    backoff = INITIAL_BACKOFF_S
    for _ in range(15):
        backoff = next_backoff(R.CONNECTION_ERROR, backoff)
        delays.append(backoff)
    assert delays[:3] == [0.02, 0.04, 0.08]
    assert delays[-1] == MAX_BACKOFF_S
    assert max(delays) == MAX_BACKOFF_S
    assert next_backoff(R.RECONNECT, MAX_BACKOFF_S) == INITIAL_BACKOFF_S
    assert next_backoff(R.COMPLETE, MAX_BACKOFF_S) == INITIAL_BACKOFF_S
    assert next_backoff(R.ERROR, 1.0) == 2.0


def test_metric_names_and_labels() -> None:
    registry = CollectorRegistry()
    metrics = XdsMetrics(registry)
    metrics.record_termination(R.RECONNECT)
    resp = DeltaDiscoveryResponse(type_url=ADDRESS_TYPE)
    resp.resources.add().resource.value = b"x" * 10
    resp.resources.add().resource.value = b"y" * 5
    metrics.record_response(resp)
    text = generate_latest(registry).decode()
    assert 'istio_xds_connection_terminations_total{reason="Reconnect"} 1.0' in text
    assert f'istio_xds_message_total{{url="{ADDRESS_TYPE}"}} 1.0' in text
    assert f'istio_xds_message_bytes_total{{url="{ADDRESS_TYPE}"}} 15.0' in text
