"""HboneConnection over in-memory pairs: tunnels, data, half-close, resets, flow control."""

from __future__ import annotations

import h2.config
import h2.connection
import h2.events
import pytest
from h2.errors import ErrorCodes
from h2.settings import SettingCodes
from hyperframe.frame import DataFrame, GoAwayFrame, RstStreamFrame

from ztunnel_py.hbone.connection import HboneConnection, HboneSettings, Role
from ztunnel_py.hbone.errors import (
    ConnectionClosed,
    HeaderListTooLarge,
    StreamLimitReached,
    UnknownStream,
)
from ztunnel_py.hbone.events import (
    ConnectionTerminated,
    DataReceived,
    GoAwayReceived,
    StreamEnded,
    StreamReset,
    TunnelAccepted,
    TunnelRejected,
    TunnelRequested,
    WindowOpened,
)
from ztunnel_py.testing.hbone_pairs import (
    ack_all,
    feed,
    of_type,
    open_accepted,
    pair,
    payload,
    xfer,
)

MiB = 1024 * 1024


def test_settings_of_the_reference_are_announced() -> None:
    client, server = pair(HboneSettings.for_role(Role.CLIENT), HboneSettings.for_role(Role.SERVER))
    # What each side learnt from the other's SETTINGS.
    assert client._h2.remote_settings.initial_window_size == 4 * MiB
    assert client._h2.remote_settings.max_frame_size == 1 * MiB
    assert client._h2.remote_settings.max_concurrent_streams == 200
    assert client._h2.remote_settings.max_header_list_size == 64 * 1024
    assert server._h2.remote_settings.max_header_list_size == 16 * 1024
    assert server._h2.remote_settings.enable_push == 0
    assert client._h2.outbound_flow_control_window == 16 * MiB
    assert server._h2.outbound_flow_control_window == 16 * MiB


def test_classic_connect_round_trip() -> None:
    client, server = pair()
    sid = client.open_tunnel("10.0.0.2:8080", [("forwarded", 'for="10.0.0.1:4000"')])
    _, sev = xfer(client, server)
    (req,) = of_type(sev, TunnelRequested)
    assert (req.stream_id, req.method, req.authority, req.ended) == (
        sid,
        "CONNECT",
        "10.0.0.2:8080",
        False,
    )
    names = [k for k, _ in req.headers]
    assert ":scheme" not in names and ":path" not in names
    assert ("forwarded", 'for="10.0.0.1:4000"') in req.headers

    server.accept(sid, [("baggage", "k8s.namespace.name=ns")])
    cev, _ = xfer(client, server)
    (acc,) = of_type(cev, TunnelAccepted)
    assert ("baggage", "k8s.namespace.name=ns") in acc.headers

    assert client.send(sid, b"ping") == 0
    cev, sev = xfer(client, server)
    assert payload(sev, sid) == b"ping"
    server.send(sid, b"pong")
    cev, sev = xfer(client, server)
    assert payload(cev, sid) == b"pong"


@pytest.mark.parametrize("chunk", [1, 7, 9, 10, 1000])
def test_byte_at_a_time_delivery_is_identical(chunk: int) -> None:
    client, server = pair()
    sid = client.open_tunnel("10.0.0.2:80")
    xfer(client, server, chunk=chunk)
    server.accept(sid)
    xfer(client, server, chunk=chunk)
    data = bytes(range(256)) * 300
    client.send(sid, data, end=True)
    _, sev = xfer(client, server, chunk=chunk)
    assert payload(sev, sid) == data
    assert of_type(sev, StreamEnded) == [StreamEnded(stream_id=sid)]


def test_half_close_each_way_and_stream_is_forgotten() -> None:
    client, server = pair()
    sid = open_accepted(client, server)
    client.end_stream(sid)
    _, sev = xfer(client, server)
    assert of_type(sev, StreamEnded) == [StreamEnded(stream_id=sid)]
    # The other direction still flows after the client's half-close.
    server.send(sid, b"late reply")
    cev, _ = xfer(client, server)
    assert payload(cev, sid) == b"late reply"
    with pytest.raises(UnknownStream):
        client.send(sid, b"after end")
    server.end_stream(sid)
    cev, _ = xfer(client, server)
    assert of_type(cev, StreamEnded) == [StreamEnded(stream_id=sid)]
    assert client.open_streams == 0 and server.open_streams == 0


def test_server_half_close_first() -> None:
    client, server = pair()
    sid = open_accepted(client, server)
    server.send(sid, b"bye", end=True)
    cev, _ = xfer(client, server)
    assert payload(cev, sid) == b"bye"
    assert of_type(cev, StreamEnded) == [StreamEnded(stream_id=sid)]
    client.send(sid, b"still here", end=True)
    _, sev = xfer(client, server)
    assert payload(sev, sid) == b"still here"


@pytest.mark.parametrize("by_client", [True, False])
def test_reset_is_reported_to_the_peer(by_client: bool) -> None:
    client, server = pair()
    sid = open_accepted(client, server)
    (client if by_client else server).reset(sid, ErrorCodes.CONNECT_ERROR)
    cev, sev = xfer(client, server)
    events = sev if by_client else cev
    assert of_type(events, StreamReset) == [
        StreamReset(stream_id=sid, error_code=ErrorCodes.CONNECT_ERROR, remote=True)
    ]
    assert client.open_streams == 0 and server.open_streams == 0
    # A second reset, or a reset of a stream never opened, is a no-op.
    client.reset(sid)
    client.reset(99)
    assert xfer(client, server) == ([], [])


def test_reject_ends_the_stream_with_status() -> None:
    client, server = pair()
    sid = client.open_tunnel("10.0.0.2:80")
    xfer(client, server)
    server.reject(sid, 401)
    cev, _sev = xfer(client, server)
    assert of_type(cev, TunnelRejected)[0].status == 401
    assert not of_type(cev, StreamEnded) and not of_type(cev, StreamReset)
    assert client.open_streams == 0 and server.open_streams == 0
    assert client._h2.open_outbound_streams == 0
    with pytest.raises(UnknownStream):
        client.send(sid, b"x")


def test_response_without_end_stream_is_rejected_and_reset() -> None:
    client, server = pair()
    sid = client.open_tunnel("10.0.0.2:80")
    xfer(client, server)
    server._h2.send_headers(sid, [(b":status", b"503")])  # a peer that forgets END_STREAM
    cev, sev = xfer(client, server)
    assert of_type(cev, TunnelRejected)[0].status == 503
    assert of_type(sev, StreamReset)[0].error_code == ErrorCodes.CANCEL


def test_send_beyond_stream_window_is_buffered_until_window_update() -> None:
    client, server = pair()
    sid = open_accepted(client, server)
    data = bytes(range(256)) * (5 * 4096)  # 5 MiB, stream window is 4 MiB
    pending = client.send(sid, data, end=True)
    assert pending == len(data) - 4 * MiB
    assert client.pending_bytes(sid) == pending
    with pytest.raises(UnknownStream):
        client.send(sid, b"more after end")
    _, sev = xfer(client, server)
    got = payload(sev, sid)
    assert len(got) == 4 * MiB and not of_type(sev, StreamEnded)
    ack_all(server, sev)
    cev, sev = xfer(client, server)
    assert of_type(cev, WindowOpened) == [WindowOpened(stream_id=sid)]
    got += payload(sev, sid)
    assert got == data
    assert of_type(sev, StreamEnded) == [StreamEnded(stream_id=sid)]
    assert client.pending_bytes(sid) == 0


def test_connection_window_is_shared_and_reopened() -> None:
    small = HboneSettings(stream_window=65535, connection_window=65535, max_frame_size=16384)
    client, server = pair(small, small)
    a = open_accepted(client, server)
    b = open_accepted(client, server, "10.0.0.3:80")
    assert client.send(a, b"a" * 50000) == 0
    assert client.send(b, b"b" * 50000) == 50000 - 15535
    assert client.send_window(b) == 0
    _, sev = xfer(client, server)
    assert len(payload(sev, a)) == 50000 and len(payload(sev, b)) == 15535
    # Frames respect the peer's 16 KiB maximum frame size.
    assert max(e.flow_controlled_length for e in of_type(sev, DataReceived)) <= 16384
    ack_all(server, sev)
    cev, sev = xfer(client, server)
    assert payload(sev, b) == b"b" * (50000 - 15535)
    assert WindowOpened(stream_id=b) in cev


def test_unacknowledged_data_stops_the_sender() -> None:
    small = HboneSettings(stream_window=65535, connection_window=65535, max_frame_size=16384)
    client, server = pair(small, small)
    sid = open_accepted(client, server)
    client.send(sid, b"x" * 200_000)
    _, sev = xfer(client, server)
    assert len(payload(sev, sid)) == 65535  # nothing more until the server consumes
    assert client.pending_bytes(sid) == 200_000 - 65535


def test_padded_and_end_stream_data_take_h2s_path() -> None:
    client, server = pair()
    sid = open_accepted(client, server)
    # A padded DATA frame (as another implementation might send) and an END_STREAM one.
    client._h2.send_data(sid, b"padded", pad_length=10)
    client._h2.send_data(sid, b"final", end_stream=True)
    _, sev = xfer(client, server)
    assert payload(sev, sid) == b"paddedfinal"
    assert of_type(sev, StreamEnded) == [StreamEnded(stream_id=sid)]
    flow = sum(e.flow_controlled_length for e in of_type(sev, DataReceived))
    assert flow == len("padded") + 11 + len("final")


def test_data_for_a_stream_reset_mid_frame_returns_connection_window() -> None:
    client, server = pair()
    sid = open_accepted(client, server)
    client.send(sid, b"z" * 100_000)
    wire = client.data_to_send()
    events = server.receive_data(wire[:50_000])
    assert 0 < len(payload(events, sid)) < 100_000
    before = server._h2._inbound_flow_control_window_manager._bytes_processed
    server.reset(sid)
    assert server.receive_data(wire[50_000:]) == []
    after = server._h2._inbound_flow_control_window_manager._bytes_processed
    assert after > before  # the rest of the frame was credited back


def test_tunnel_requested_reports_the_method_for_the_server_to_refuse() -> None:
    client, server = pair()
    raw = client._h2
    sid = raw.get_next_available_stream_id()
    raw.send_headers(
        sid,
        [(b":method", b"GET"), (b":scheme", b"https"), (b":path", b"/"), (b":authority", b"a:1")],
        end_stream=True,
    )
    _, sev = xfer(client, server)
    (req,) = of_type(sev, TunnelRequested)
    assert req.method == "GET" and req.ended
    assert not of_type(sev, StreamEnded)  # already reported through ended=True


def test_client_stream_limit() -> None:
    limited = HboneSettings(max_concurrent_streams=2)
    client, server = pair(None, limited)
    open_accepted(client, server)
    open_accepted(client, server)
    with pytest.raises(StreamLimitReached) as e:
        client.open_tunnel("10.0.0.2:80")
    assert e.value.limit == 2


def test_stream_flood_past_the_limit_terminates_only_that_connection() -> None:
    limited = HboneSettings(max_concurrent_streams=2)
    server = HboneConnection(Role.SERVER, limited)
    raw = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    raw.initiate_connection()
    server.receive_data(raw.data_to_send())
    raw.receive_data(server.data_to_send())
    # A client that ignores MAX_CONCURRENT_STREAMS=2.
    raw.remote_settings[SettingCodes.MAX_CONCURRENT_STREAMS] = 10
    raw.remote_settings.acknowledge()
    events = []
    for _ in range(3):
        sid = raw.get_next_available_stream_id()
        raw.send_headers(sid, [(":method", "CONNECT"), (":authority", "10.0.0.2:80")])
        events += server.receive_data(raw.data_to_send())
    assert len(of_type(events, TunnelRequested)) == 2
    (term,) = of_type(events, ConnectionTerminated)
    assert term.error_code == ErrorCodes.PROTOCOL_ERROR and not term.remote
    assert server.is_terminated
    goaway = [
        e
        for e in raw.receive_data(server.data_to_send())
        if isinstance(e, h2.events.ConnectionTerminated)
    ]
    assert goaway and goaway[0].error_code == ErrorCodes.PROTOCOL_ERROR
    assert server.receive_data(b"anything") == []


def test_request_headers_over_the_peer_limit_are_refused_locally() -> None:
    client, _server = pair()
    with pytest.raises(HeaderListTooLarge) as e:
        client.open_tunnel("10.0.0.2:80", [("baggage", "x" * 70_000)])
    assert e.value.limit == 64 * 1024


def test_oversized_inbound_headers_terminate_the_connection() -> None:
    server = HboneConnection(Role.SERVER, HboneSettings.for_role(Role.SERVER))
    raw = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    raw.initiate_connection()
    server.receive_data(raw.data_to_send())
    raw.receive_data(server.data_to_send())
    sid = raw.get_next_available_stream_id()
    raw.send_headers(
        sid, [(":method", "CONNECT"), (":authority", "10.0.0.2:80"), ("big", "y" * 70_000)]
    )
    events = server.receive_data(raw.data_to_send())
    (term,) = of_type(events, ConnectionTerminated)
    assert term.error_code == ErrorCodes.ENHANCE_YOUR_CALM
    assert not of_type(events, TunnelRequested)


def test_garbage_is_a_protocol_error_not_an_exception() -> None:
    server = HboneConnection(Role.SERVER)
    events = server.receive_data(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    (term,) = of_type(events, ConnectionTerminated)
    assert term.error_code == ErrorCodes.PROTOCOL_ERROR and "preamble" in term.reason.lower()


def test_oversized_frame_is_refused_from_its_header() -> None:
    client, server = pair()
    sid = open_accepted(client, server)
    frame = DataFrame(sid, data=b"q" * 100)
    header = bytearray(frame.serialize()[:9])
    header[0:3] = (2 * MiB).to_bytes(3, "big")
    events = server.receive_data(bytes(header))
    (term,) = of_type(events, ConnectionTerminated)
    assert term.error_code == ErrorCodes.FRAME_SIZE_ERROR


def test_data_beyond_the_window_is_a_flow_control_error() -> None:
    small = HboneSettings(stream_window=65535, connection_window=1 << 20, max_frame_size=1 << 20)
    client, server = pair(HboneSettings(max_frame_size=1 << 20), small)
    sid = open_accepted(client, server)
    # Write a frame bigger than the stream window by hand, bypassing the client's accounting.
    events = server.receive_data(DataFrame(sid, data=b"w" * 70_000).serialize())
    # h2 answers a per-stream overflow with RST_STREAM(FLOW_CONTROL_ERROR) or a GOAWAY.
    client_events = client.receive_data(server.data_to_send())
    terminated = of_type(events, ConnectionTerminated)
    reset = of_type(client_events, StreamReset)
    assert terminated or reset
    assert not payload(events, sid)


def test_data_on_an_unknown_stream_is_handled_by_h2() -> None:
    client, server = pair()
    sid = open_accepted(client, server)
    client.reset(sid)
    xfer(client, server)
    events = server.receive_data(DataFrame(sid, data=b"stale").serialize())
    assert not payload(events, sid)
    assert not server.is_terminated


def test_peer_graceful_goaway_lets_open_streams_finish() -> None:
    client, server = pair()
    sid = open_accepted(client, server)
    late = client.open_tunnel("10.0.0.9:80")  # not yet seen by the server
    server.drain()
    server.drain()  # idempotent
    cev = client.receive_data(server.data_to_send())
    assert GoAwayReceived(last_stream_id=sid, error_code=0) in cev
    assert StreamReset(stream_id=late, error_code=ErrorCodes.REFUSED_STREAM, remote=False) in cev
    assert not client.accepts_new_streams
    with pytest.raises(ConnectionClosed):
        client.open_tunnel("10.0.0.2:80")
    # The stream opened before the GOAWAY still works both ways; the late one is refused.
    client.send(sid, b"after goaway", end=True)
    cev, sev = xfer(client, server)
    assert payload(sev, sid) == b"after goaway"
    assert TunnelRequested not in {type(e) for e in sev}
    server.send(sid, b"reply", end=True)
    cev, _ = xfer(client, server)
    assert payload(cev, sid) == b"reply"


def test_draining_server_refuses_new_streams() -> None:
    client, server = pair()
    server.drain()
    # The client has not read the GOAWAY yet and opens a stream anyway.
    sid = client.open_tunnel("10.0.0.2:80")
    sev = server.receive_data(client.data_to_send())
    assert not of_type(sev, TunnelRequested)
    cev = client.receive_data(server.data_to_send())
    assert StreamReset(stream_id=sid, error_code=ErrorCodes.REFUSED_STREAM, remote=False) in cev


def test_goaway_with_error_terminates() -> None:
    client, server = pair()
    open_accepted(client, server)
    frame = GoAwayFrame(
        0, last_stream_id=1, error_code=ErrorCodes.INTERNAL_ERROR, additional_data=b"boom"
    )
    events = client.receive_data(frame.serialize())
    (term,) = of_type(events, ConnectionTerminated)
    assert term.remote and term.error_code == ErrorCodes.INTERNAL_ERROR and "boom" in term.reason
    assert client.is_terminated and client.open_streams == 0
    with pytest.raises(ConnectionClosed):
        client.open_tunnel("10.0.0.2:80")


def test_close_sends_goaway() -> None:
    client, server = pair()
    client.close(ErrorCodes.NO_ERROR, "shutting down")
    events = server.receive_data(client.data_to_send())
    assert (
        GoAwayReceived(last_stream_id=0, error_code=0, additional_data=b"shutting down") in events
    )
    client.close()  # idempotent
    assert client.get_timer() is None


def test_keepalive_ping_and_timeout() -> None:
    client = HboneConnection(Role.CLIENT, now=100.0)
    server = HboneConnection(Role.SERVER, now=100.0)
    xfer(client, server)
    assert client.get_timer() == 110.0
    assert client.handle_timer(105.0) == []
    assert client.data_to_send() == b""
    client.handle_timer(110.0)
    ping = client.data_to_send()
    assert ping  # a PING frame
    assert client.get_timer() == 130.0  # 20 s to answer
    server.receive_data(ping)
    events = client.receive_data(server.data_to_send())
    assert [type(e).__name__ for e in events] == ["PingAcked"]
    assert client.get_timer() == 120.0
    client.handle_timer(120.0)
    client.data_to_send()  # PING lost: the server never sees it
    assert client.handle_timer(139.0) == []
    events = client.handle_timer(140.0)
    (term,) = of_type(events, ConnectionTerminated)
    assert "keepalive" in term.reason and not term.remote
    assert client.is_terminated and client.handle_timer(200.0) == []
    assert client.get_timer() is None


def test_commands_on_unknown_streams() -> None:
    client, server = pair()
    with pytest.raises(UnknownStream):
        client.send(5, b"x")
    with pytest.raises(UnknownStream):
        server.accept(7)
    client.acknowledge(1, 0)  # no-op


def test_accept_after_the_client_reset_raises_unknown_stream() -> None:
    client, server = pair()
    sid = client.open_tunnel("10.0.0.2:80")
    xfer(client, server)
    client.reset(sid)
    # The server learns of the reset only from the wire; before that, accept races it.
    server.receive_data(client.data_to_send())
    with pytest.raises(UnknownStream):
        server.accept(sid)


def test_many_streams_interleaved() -> None:
    client, server = pair()
    sids = [open_accepted(client, server, f"10.0.0.{i}:80") for i in range(1, 21)]
    for i, sid in enumerate(sids):
        client.send(sid, bytes([i]) * (1000 + i), end=True)
    _, sev = xfer(client, server)
    for i, sid in enumerate(sids):
        assert payload(sev, sid) == bytes([i]) * (1000 + i)
    assert len(of_type(sev, StreamEnded)) == 20


def test_rst_stream_frame_from_raw_peer() -> None:
    client, server = pair()
    sid = open_accepted(client, server)
    events = server.receive_data(RstStreamFrame(sid, error_code=ErrorCodes.CANCEL).serialize())
    assert events == [StreamReset(stream_id=sid, error_code=ErrorCodes.CANCEL, remote=True)]


def test_headers_frame_between_data_is_handled_in_order() -> None:
    client, server = pair()
    sid = open_accepted(client, server)
    client.send(sid, b"first")
    second = client.open_tunnel("10.0.0.3:80")
    client.send(sid, b"second")
    wire = client.data_to_send()
    events = feed(server, wire, None)
    kinds = [type(e).__name__ for e in events]
    assert kinds == ["DataReceived", "TunnelRequested", "DataReceived"]
    assert of_type(events, TunnelRequested)[0].stream_id == second


def test_small_acknowledgements_are_batched_and_released_with_the_stream() -> None:
    client, server = pair()
    sid = open_accepted(client, server)
    manager = server._h2._inbound_flow_control_window_manager
    for _ in range(10):
        client.send(sid, b"a" * 1000)
        _, sev = xfer(client, server)
        ack_all(server, sev)
    # 10 KB consumed, below the 16 KiB batch: nothing handed to h2 yet.
    assert manager._bytes_processed == 0
    client.send(sid, b"b" * 7000)
    _, sev = xfer(client, server)
    ack_all(server, sev)
    assert manager._bytes_processed == 17_000  # the batch went through at once
    client.send(sid, b"c" * 500)
    _, sev = xfer(client, server)
    ack_all(server, sev)
    server.reset(sid)
    # Forgetting the stream returns what it still held to the connection window.
    assert manager._bytes_processed == 17_500


def test_on_data_takes_fast_path_payload_without_events() -> None:
    client, server = pair()
    sid = open_accepted(client, server)
    got: list[tuple[int, bytes, int]] = []
    server.on_data = lambda stream_id, data, n: got.append((stream_id, data, n))
    client.send(sid, b"x" * 1000)
    client.send(sid, b"y" * 24)
    events = server.receive_data(client.data_to_send())
    assert not of_type(events, DataReceived)
    assert got == [(sid, b"x" * 1000, 1000), (sid, b"y" * 24, 24)]


def test_on_data_keeps_order_with_events_of_the_same_read() -> None:
    client, server = pair()
    got: list[bytes] = []
    server.on_data = lambda stream_id, data, n: got.append(data)
    # The request and payload sent before the answer arrive in one read: the payload must
    # come after TunnelRequested (the adapter sets the stream up from it), so it stays an event.
    sid = client.open_tunnel("10.0.0.2:8080")
    client.send(sid, b"early")
    events = server.receive_data(client.data_to_send())
    assert [type(e) for e in events] == [TunnelRequested, DataReceived]
    assert payload(events, sid) == b"early"
    assert got == []
    server.accept(sid)
    client.receive_data(server.data_to_send())
    # Payload and the stream's end in one read: the payload goes out first, then the event.
    client.send(sid, b"late")
    client.end_stream(sid)
    events = server.receive_data(client.data_to_send())
    assert got == [b"late"]
    assert [type(e) for e in events] == [StreamEnded]
