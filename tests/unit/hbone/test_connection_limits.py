"""Limits of the server side against abusive peers: header blocks spread over CONTINUATION
frames, and streams cancelled before they are answered (rapid reset)."""

from __future__ import annotations

from h2.errors import ErrorCodes
from hyperframe.frame import ContinuationFrame, GoAwayFrame, HeadersFrame

from ztunnel_py.hbone.connection import HboneSettings
from ztunnel_py.hbone.events import ConnectionTerminated, StreamReset, TunnelRequested
from ztunnel_py.testing.hbone_pairs import of_type, pair, xfer

KiB = 1024


def _goaway_code(wire: bytes) -> int:
    """The error code of the GOAWAY frame in ``wire`` (the server's output)."""
    pos = 0
    while pos + 9 <= len(wire):
        length = int.from_bytes(wire[pos : pos + 3], "big")
        if wire[pos + 3] == GoAwayFrame.type:
            frame = GoAwayFrame(0)
            frame.parse_body(memoryview(wire[pos + 9 : pos + 9 + length]))
            return int(frame.error_code)
        pos += 9 + length
    raise AssertionError("no GOAWAY in the server's output")


def test_continuation_flood_is_refused_before_it_is_buffered() -> None:
    client, server = pair()
    limit = server.settings.max_header_list_size
    block = client._h2.encoder.encode([(b":method", b"CONNECT"), (b":authority", b"b:1")])
    sent = 0
    events = server.receive_data(HeadersFrame(1, data=block).serialize())  # no END_HEADERS
    filler = b"\x00" * (16 * KiB)
    while not of_type(events, ConnectionTerminated) and sent < 64 * limit:
        frame = ContinuationFrame(1, data=filler).serialize()
        events = server.receive_data(frame[:9])  # the header alone must be enough
        if not of_type(events, ConnectionTerminated):
            events += server.receive_data(frame[9:])
        sent += len(filler)
    (term,) = of_type(events, ConnectionTerminated)
    assert term.error_code == ErrorCodes.ENHANCE_YOUR_CALM
    assert sent <= limit + 16 * KiB, f"{sent} bytes of header block taken in"
    assert not server._h2.incoming_buffer._headers_buffer or server.is_terminated
    assert _goaway_code(server.data_to_send()) == ErrorCodes.ENHANCE_YOUR_CALM
    assert server.receive_data(ContinuationFrame(1, data=filler).serialize()) == []


def test_one_huge_headers_frame_is_refused_from_its_frame_header() -> None:
    _client, server = pair()
    frame_header = HeadersFrame(1, data=b"\x00" * (1024 * KiB)).serialize()[:9]
    (term,) = of_type(server.receive_data(frame_header), ConnectionTerminated)
    assert term.error_code == ErrorCodes.ENHANCE_YOUR_CALM


def test_a_request_split_over_continuation_frames_within_the_limit_is_served() -> None:
    client, server = pair()
    headers = [(b":method", b"CONNECT"), (b":authority", b"10.0.0.2:80"), (b"x-big", b"v" * 8000)]
    block = client._h2.encoder.encode(headers)
    third = len(block) // 3
    frames = (
        HeadersFrame(1, data=block[:third]).serialize()
        + ContinuationFrame(1, data=block[third : 2 * third]).serialize()
        + ContinuationFrame(1, data=block[2 * third :], flags=["END_HEADERS"]).serialize()
    )
    events = server.receive_data(frames)
    (req,) = of_type(events, TunnelRequested)
    assert req.authority == "10.0.0.2:80"
    assert not of_type(events, ConnectionTerminated)


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
