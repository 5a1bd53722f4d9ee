"""The headers of double HBONE: what the sender puts on each CONNECT, and which tunnels the
receiver takes as having come through an east-west gateway."""

from __future__ import annotations

import ipaddress

import pytest

from ztunnel_py.hbone.headers import Baggage, Forwarded, TraceParent, parse_connect_request
from ztunnel_py.proxy.double_hbone import tunnel_headers
from ztunnel_py.proxy.inbound import from_gateway


@pytest.mark.parametrize(
    ("headers", "network", "through_gateway"),
    [
        ((), "net-b", False),  # a direct tunnel names no origin network
        ((("x-forwarded-network", "net-a"),), "net-b", True),
        ((("x-forwarded-network", "NET-B"),), "net-b", False),  # ours, compared caselessly
        ((("x-forwarded-network", ""),), "net-b", True),  # from the default network
        ((("x-forwarded-network", ""),), "", False),
    ],
)
def test_origin_network_other_than_ours_means_through_a_gateway(
    headers: tuple[tuple[str, str], ...], network: str, through_gateway: bool
) -> None:
    request = parse_connect_request("CONNECT", "echo.default.svc.cluster.local:80", headers)
    assert from_gateway(request, network) is through_gateway


def test_only_the_inner_connect_names_the_origin_network() -> None:
    """ztunnel's ``test_x_forwarded_network_header``: the outer CONNECT (to the gateway) has
    no ``x-forwarded-network``, the inner one has this node's network; the rest is the same."""
    outer, inner = tunnel_headers(
        forwarded=Forwarded(ipaddress.ip_address("10.0.0.1"), 40000, "echo.default.svc"),
        baggage=Baggage(namespace="default", workload_name="client"),
        traceparent=TraceParent(1, 2),
        origin_network="net-a",
    )
    assert dict(inner).pop("x-forwarded-network") == "net-a"
    assert "x-forwarded-network" not in dict(outer)
    assert [h for h in inner if h[0] != "x-forwarded-network"] == outer
    assert dict(outer)["forwarded"] == 'for="10.0.0.1:40000";host=echo.default.svc'
