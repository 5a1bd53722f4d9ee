"""Less travelled paths of HboneConnection: mixed frame batches, partial windows, odd peers."""

from __future__ import annotations

import h2.config
import h2.connection
import pytest
from h2.errors import ErrorCodes
from hyperframe.frame import (
    DataFrame,
    GoAwayFrame,
    HeadersFrame,
    PingFrame,
)

from ztunnel_py.config import Config, RootCert, RootCertKind
from ztunnel_py.hbone.connection import HboneConnection, HboneSettings, Role
from ztunnel_py.hbone.errors import HboneError, UnknownStream
from ztunnel_py.hbone.events import (
    ConnectionTerminated,
    DataReceived,
    GoAwayReceived,
    StreamEnded,
    TunnelRequested,
    WindowOpened,
)
from ztunnel_py.proxy.transport import hbone_settings
from ztunnel_py.testing.hbone_pairs import (
    ack_all,
    of_type,
    open_accepted,
    pair,
    payload,
    xfer,
)


def test_settings_follow_config() -> None:
    root = RootCert(RootCertKind.FILE, "/x")
    config = Config(
        xds_address=None,
        ca_address=None,
        xds_root_cert=root,
        ca_root_cert=root,
        http2_stream_window_size=1 << 20,
        http2_connection_window_size=8 << 20,
        http2_frame_size=64 * 1024,
    )
    s = hbone_settings(Role.SERVER, config)
    assert (s.stream_window, s.connection_window, s.max_frame_size) == (1 << 20, 8 << 20, 65536)
    assert s.max_header_list_size == 64 * 1024
    assert hbone_settings(Role.CLIENT, config).max_header_list_size == 16 * 1024


def test_introspection() -> None:
    client, server = pair()
    sid = open_accepted(client, server)
    assert client.has_stream(sid) and not client.has_stream(sid + 2)
    assert client.send_window(sid) == 4 * 1024 * 1024
    client.reset(sid)
    xfer(client, server)
    assert client.send_window(sid) == 0  # a closed stream has no window


def test_client_preface_may_arrive_in_pieces() -> None:
    client = HboneConnection(Role.CLIENT)
    server = HboneConnection(Role.SERVER)
    wire = client.data_to_send()
    assert server.receive_data(wire[:10]) == []
    assert server.receive_data(wire[10:24]) == []  # exactly the rest of the magic
    server.receive_data(wire[24:])
    client.receive_data(server.data_to_send())
    sid = client.open_tunnel("10.0.0.2:80")
    (req,) = of_type(server.receive_data(client.data_to_send()), TunnelRequested)
    assert req.stream_id == sid


def test_server_must_accept_before_sending() -> None:
    client, server = pair()
    sid = client.open_tunnel("10.0.0.2:80")
    xfer(client, server)
    with pytest.raises(HboneError):
        server.send(sid, b"too early")


def test_reject_of_a_request_that_already_ended() -> None:
    client, server = pair()
    raw = client._h2
    sid = raw.get_next_available_stream_id()
    raw.send_headers(sid, [(":method", "CONNECT"), (":authority", "a:1")], end_stream=True)
    _, sev = xfer(client, server)
    assert of_type(sev, TunnelRequested)[0].ended
    server.reject(sid, 400)
    assert server.data_to_send()  # the 400, and no RST: the client already finished


def test_protocol_error_in_a_batch_stops_before_the_next_data_frame() -> None:
    client, server = pair()
    sid = open_accepted(client, server)
    bad_ping = bytearray(PingFrame(0, opaque_data=b"12345678").serialize())
    bad_ping[0:3] = (4).to_bytes(3, "big")  # PING must be 8 bytes long
    wire = bytes(bad_ping[:9]) + b"1234" + DataFrame(sid, data=b"after").serialize()
    events = server.receive_data(wire)
    assert of_type(events, ConnectionTerminated)
    assert not payload(events, sid)


def test_oversized_frame_after_control_frames_in_one_read() -> None:
    client, server = pair()
    open_accepted(client, server)
    ping = PingFrame(0, opaque_data=b"abcdefgh").serialize()
    huge = bytearray(DataFrame(1, data=b"x").serialize()[:9])
    huge[0:3] = (2 * 1024 * 1024).to_bytes(3, "big")
    events = server.receive_data(ping + bytes(huge))
    (term,) = of_type(events, ConnectionTerminated)
    assert term.error_code == ErrorCodes.FRAME_SIZE_ERROR


def test_goaway_after_control_frames_in_one_read() -> None:
    client, server = pair()
    open_accepted(client, server)
    ping = PingFrame(0, opaque_data=b"abcdefgh").serialize()
    goaway = GoAwayFrame(0, last_stream_id=1, error_code=0).serialize()
    events = client.receive_data(ping + goaway)
    assert GoAwayReceived(last_stream_id=1, error_code=0) in events


def test_data_inside_an_unfinished_header_block_is_a_protocol_error() -> None:
    client, server = pair()
    sid = open_accepted(client, server)
    encoder_block = client._h2.encoder.encode([(b":method", b"CONNECT"), (b":authority", b"b:1")])
    headers = HeadersFrame(sid + 2, data=encoder_block)  # no END_HEADERS: CONTINUATION must follow
    events = server.receive_data(headers.serialize() + DataFrame(sid, data=b"x").serialize())
    assert of_type(events, ConnectionTerminated)


def test_data_after_the_peer_ended_its_side_is_refused_by_h2() -> None:
    client, server = pair()
    sid = open_accepted(client, server)
    client.end_stream(sid)
    xfer(client, server)
    events = server.receive_data(DataFrame(sid, data=b"after end").serialize())
    assert not payload(events, sid)


def test_response_for_a_stream_we_already_reset() -> None:
    client, server = pair()
    sid = client.open_tunnel("10.0.0.2:80")
    xfer(client, server)
    client.reset(sid)
    server.accept(sid)  # crosses the client's RST on the wire
    events = client.receive_data(server.data_to_send())
    assert events == []


def test_data_for_a_stream_the_client_rejected_is_credited_back() -> None:
    client, server = pair()
    sid = client.open_tunnel("10.0.0.2:80")
    xfer(client, server)
    server._h2.send_headers(sid, [(b":status", b"403")])
    server._h2.send_data(sid, b"explanation", end_stream=True)
    before = client._h2._inbound_flow_control_window_manager._bytes_processed
    cev = client.receive_data(server.data_to_send())
    assert of_type(cev, DataReceived) == []
    assert client._h2._inbound_flow_control_window_manager._bytes_processed > before


def test_sends_queue_behind_buffered_data_and_flush_in_parts() -> None:
    small = HboneSettings(stream_window=65535, connection_window=65535, max_frame_size=16384)
    client, server = pair(small, small)
    a = open_accepted(client, server)
    b = open_accepted(client, server, "10.0.0.3:80")
    assert client.send(a, b"a" * 70_000) == 70_000 - 65535
    assert client.send(a, b"more") == 70_000 - 65535 + 4  # queued behind the buffer
    assert client.send(b, b"b" * 10) == 10  # the connection window is exhausted
    _, sev = xfer(client, server)
    # Give back only 2000 bytes: part of a's buffered chunk goes out, the rest stays.
    for e in of_type(sev, DataReceived)[:1]:
        server.acknowledge(e.stream_id, 2000)
    server._h2.acknowledge_received_data(2000, a)
    cev, sev = xfer(client, server)
    assert WindowOpened(stream_id=a) not in cev
    assert 0 < len(payload(sev, a)) < 70_000 - 65535
    ack_all(server, sev)
    for _ in range(5):
        server._h2.acknowledge_received_data(65535, a)
        server._h2.acknowledge_received_data(65535, b)
        cev, sev = xfer(client, server)
        if WindowOpened(stream_id=b) in cev:
            break
    assert client.pending_bytes(a) == 0 and client.pending_bytes(b) == 0


def test_goaway_with_an_unknown_error_code_is_named_by_number() -> None:
    client, _server = pair()
    events = client.receive_data(GoAwayFrame(0, last_stream_id=0, error_code=0x99).serialize())
    (term,) = of_type(events, ConnectionTerminated)
    assert "error code 153" in term.reason


def test_raw_h2_client_interoperates() -> None:
    server = HboneConnection(Role.SERVER)
    raw = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    raw.initiate_connection()
    server.receive_data(raw.data_to_send())
    raw.receive_data(server.data_to_send())
    sid = raw.get_next_available_stream_id()
    raw.send_headers(sid, [(":method", "CONNECT"), (":authority", "10.0.0.2:80")])
    raw.send_data(sid, b"hello", end_stream=True)
    events = server.receive_data(raw.data_to_send())
    assert [type(e).__name__ for e in events] == ["TunnelRequested", "DataReceived", "StreamEnded"]
    assert of_type(events, StreamEnded) == [StreamEnded(stream_id=sid)]
    with pytest.raises(UnknownStream):
        server.accept(sid + 2)


def test_oversized_control_frame_after_other_frames_in_one_read() -> None:
    client, server = pair()
    open_accepted(client, server)
    ping = PingFrame(0, opaque_data=b"abcdefgh").serialize()
    huge = bytearray(HeadersFrame(3, data=b"x").serialize()[:9])
    huge[0:3] = (2 * 1024 * 1024).to_bytes(3, "big")
    (term,) = of_type(server.receive_data(ping + bytes(huge)), ConnectionTerminated)
    assert term.error_code == ErrorCodes.FRAME_SIZE_ERROR
    assert server.receive_data(ping) == []


def test_rejection_with_end_stream_reports_no_stream_end() -> None:
    client, server = pair()
    sid = client.open_tunnel("10.0.0.2:80")
    xfer(client, server)
    server._h2.send_headers(sid, [(b":status", b"500")], end_stream=True)
    events = client.receive_data(server.data_to_send())
    assert [type(e).__name__ for e in events] == ["TunnelRejected"]
