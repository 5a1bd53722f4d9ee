"""h2's private state as the DATA fast path uses it (``hbone.h2_internals``).

These fail the day an h2 release renames or changes what the fast path touches; the range in
pyproject.toml pins the releases they passed with.
"""

from __future__ import annotations

from typing import Any

import h2.config
import h2.connection
import h2.exceptions
import hpack
import pytest
from hyperframe.frame import ContinuationFrame, HeadersFrame, WindowUpdateFrame

from ztunnel_py.hbone.h2_internals import (
    consume_inbound_window,
    consume_outbound_window,
    has_output,
    headers_in_progress,
)

REQUEST = [(":method", "CONNECT"), (":authority", "10.0.0.2:80")]


def connected() -> tuple[h2.connection.H2Connection, h2.connection.H2Connection]:
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    server = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
    client.initiate_connection()
    server.initiate_connection()
    server.receive_data(client.data_to_send())
    client.receive_data(server.data_to_send())
    server.receive_data(client.data_to_send())
    return client, server


def open_stream(
    client: h2.connection.H2Connection, server: h2.connection.H2Connection
) -> tuple[Any, Any]:
    client.send_headers(1, REQUEST)
    server.receive_data(client.data_to_send())
    server.send_headers(1, [(":status", "200")])
    client.receive_data(server.data_to_send())
    return client.streams[1], server.streams[1]


def test_has_output_follows_h2s_send_buffer() -> None:
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    assert not has_output(client)
    client.initiate_connection()
    assert has_output(client)
    assert client.data_to_send()
    assert not has_output(client)


def test_headers_in_progress_until_the_block_ends() -> None:
    _, server = connected()
    block = hpack.Encoder().encode(REQUEST)
    first = HeadersFrame(1, data=block[:3])  # no END_HEADERS: a CONTINUATION must follow
    assert not headers_in_progress(server)
    server.receive_data(first.serialize())
    assert headers_in_progress(server)
    rest = ContinuationFrame(1, data=block[3:], flags=["END_HEADERS"])
    server.receive_data(rest.serialize())
    assert not headers_in_progress(server)


def test_consumed_inbound_bytes_count_in_h2s_windows_and_updates() -> None:
    client, server = connected()
    _, stream = open_stream(client, server)
    server.data_to_send()
    before = (server.inbound_flow_control_window, stream.inbound_flow_control_window)
    assert consume_inbound_window(server, stream, 40_000)
    after = (server.inbound_flow_control_window, stream.inbound_flow_control_window)
    assert after == (before[0] - 40_000, before[1] - 40_000)
    # h2 gives the window back for bytes it never parsed once they are acknowledged.
    server.acknowledge_received_data(40_000, 1)
    frames = server.data_to_send()
    assert frames[3] == WindowUpdateFrame.type  # the type byte of the first frame header


def test_inbound_bytes_beyond_the_window_are_left_to_h2() -> None:
    client, server = connected()
    _, stream = open_stream(client, server)
    window = stream.inbound_flow_control_window
    assert not consume_inbound_window(server, stream, window + 1)
    assert stream.inbound_flow_control_window == window


def test_consumed_outbound_bytes_limit_h2s_own_sends() -> None:
    client, server = connected()
    stream, _ = open_stream(client, server)
    window = client.local_flow_control_window(1)
    consume_outbound_window(client, stream, window - 10)
    assert client.local_flow_control_window(1) == 10
    with pytest.raises(h2.exceptions.FlowControlError):
        client.send_data(1, b"x" * 11)
