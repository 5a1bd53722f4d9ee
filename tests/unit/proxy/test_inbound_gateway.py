"""The receiving side of double HBONE: which tunnels came through an east-west gateway."""

from __future__ import annotations

import pytest

from ztunnel_py.hbone.headers import parse_connect_request
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
