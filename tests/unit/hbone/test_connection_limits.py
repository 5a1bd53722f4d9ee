"""Limits of the server side against abusive peers: streams cancelled before they are
answered (rapid reset)."""

from __future__ import annotations

from h2.errors import ErrorCodes

from ztunnel_py.hbone.connection import HboneSettings
from ztunnel_py.hbone.events import ConnectionTerminated, StreamReset
from ztunnel_py.testing.hbone_pairs import of_type, pair, xfer

KiB = 1024


def test_rapid_reset_ends_the_connection_with_enhance_your_calm() -> None:
    client, server = pair(server_settings=HboneSettings(max_header_list_size=64 * KiB))
    limit = server.settings.max_early_resets
    terminated: list[ConnectionTerminated] = []
    cancelled = 0
    while cancelled < 10 * limit:
        cancelled += 1
        sid = client.open_tunnel("10.0.0.2:80")
        client.reset(sid)
        _, server_events = xfer(client, server)
        terminated = of_type(server_events, ConnectionTerminated)
        if terminated or server.is_terminated:
            break
    assert terminated and terminated[0].error_code == ErrorCodes.ENHANCE_YOUR_CALM
    assert cancelled == limit + 1
    assert "cancelled" in terminated[0].reason


def test_cancellations_among_answered_streams_are_tolerated() -> None:
    client, server = pair()
    limit = server.settings.max_early_resets
    for _ in range(3 * limit):
        answered = client.open_tunnel("10.0.0.2:80")
        cancelled = client.open_tunnel("10.0.0.2:80")
        client.reset(cancelled)
        _, events = xfer(client, server)
        assert any(e.stream_id == cancelled for e in of_type(events, StreamReset))
        server.accept(answered)
        client.reset(answered)
        xfer(client, server)
    assert not server.is_terminated
