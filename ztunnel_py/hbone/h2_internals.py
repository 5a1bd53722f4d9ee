"""The only place that reaches into h2's private state, for the DATA fast path.

h2's own DATA path costs several times the CPU of ours (a short micro-benchmark, 32 MiB
through an in-memory pair, moved 400-500 MB/s ours against 70-160 MB/s h2's), so received
DATA frames of an established tunnel skip h2's frame parser and our sent DATA frames skip
``send_data``. h2 must still see the flow-control windows move, which it only allows through
these private attributes. The h2 versions they are known to hold in are pinned in
``pyproject.toml``; ``tests/unit/hbone/test_h2_internals.py`` fails the day a release changes
them.
"""

from __future__ import annotations

from typing import Any


def has_output(conn: Any) -> bool:
    """Whether h2 has frames to send (``data_to_send()`` copies even an empty buffer)."""
    return bool(conn._data_to_send)


def headers_in_progress(conn: Any) -> bool:
    """Whether h2 is in the middle of a HEADERS+CONTINUATION block (no frame may cut in)."""
    return bool(conn.incoming_buffer._headers_buffer)


def consume_inbound_window(conn: Any, stream: Any, length: int) -> bool:
    """Take ``length`` bytes of a DATA frame h2 did not parse off the connection's and the
    stream's receive windows; ``False`` (nothing taken) when either window is too small, so
    the frame goes through h2, which raises the flow-control error."""
    conn_window = conn._inbound_flow_control_window_manager
    stream_window = stream._inbound_window_manager
    if length > conn_window.current_window_size or length > stream_window.current_window_size:
        return False
    # What ``WindowManager.window_consumed`` does, minus its check: both fit (above).
    conn_window.current_window_size -= length
    stream_window.current_window_size -= length
    return True


def consume_outbound_window(conn: Any, stream: Any, length: int) -> None:
    """Take ``length`` bytes of DATA we framed ourselves off h2's send windows."""
    conn.outbound_flow_control_window -= length
    stream.outbound_flow_control_window -= length
