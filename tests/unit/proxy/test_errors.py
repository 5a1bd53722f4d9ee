"""Operator-facing proxy errors: the status each inbound refusal maps to, and ztunnel's hints."""

from __future__ import annotations

from ztunnel_py.proxy.errors import (
    BadRequest,
    PolicyDenied,
    SelfCall,
    UpstreamConnectError,
    UpstreamUnavailable,
)


def test_inbound_refusals_carry_their_status() -> None:
    assert [c("x").status for c in (BadRequest, SelfCall, PolicyDenied, UpstreamUnavailable)] == [
        400,
        400,
        401,
        503,
    ]


def test_hbone_timeout_hints_at_network_policy() -> None:
    e = UpstreamConnectError("10.0.0.2:15008", "connection timed out after 10s", hbone=True)
    assert str(e) == (
        "failed to connect to 10.0.0.2:15008: connection timed out after 10s,"
        " maybe a NetworkPolicy is blocking HBONE port 15008"
    )


def test_hbone_refused_hints_at_the_listener() -> None:
    e = UpstreamConnectError("10.0.0.2:15008", "connection refused", hbone=True)
    assert "listening on port 15008" in str(e)


def test_plain_tcp_errors_carry_no_hbone_hint() -> None:
    e = UpstreamConnectError("10.0.0.2:80", "connection timed out after 10s", hbone=False)
    assert "15008" not in str(e)
