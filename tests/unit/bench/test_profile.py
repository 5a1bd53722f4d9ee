"""tools/bench/profile.py and cpureq.py: stacks sorted into parts of the request path."""

from __future__ import annotations

from pathlib import Path

import pytest

from tools.bench.cpureq import Sample, parse_code, summarize
from tools.bench.profile import (
    IDLE,
    OTHER,
    WRITE_TO_APP,
    WRITE_TO_PEER,
    breakdown,
    classify,
    read_collapsed,
    table,
)

LOOP = "run_forever (loop.c:33192);uv_run (core.c:464)"
TO_PEER = (
    "TcpSide.data_received (ztunnel_py/proxy/splice.py:83);"
    "HboneProtocol._flush (ztunnel_py/proxy/transport.py:362);"
    "SSLProtocol__process_outgoing (loop.c:1)"
)
TO_APP = (
    "HboneSplice.hbone_data (ztunnel_py/proxy/splice.py:287);"
    "TcpSide.write (ztunnel_py/proxy/splice.py:139);UVStream_write (loop.c:1)"
)
DELIVER = "HboneConnection._deliver (ztunnel_py/hbone/connection.py:437)"
STACKS = f"""\
{LOOP};epoll_pwait (libc.so.6) 40
{LOOP};{TO_PEER};write (libc.so.6) 20
{LOOP};{TO_APP};write (libc.so.6) 30
{LOOP};SSLObject.write (ssl.py:930);SSL_write_ex (libssl.so.3);0x7f (libcrypto.so.3) 15
{LOOP};{DELIVER};__create_fn__.<locals>.__init__ (<string>:3) 10
{LOOP};Handler.emit (logging/__init__.py:1) 5
{LOOP};Meter.record (ztunnel_py/telemetry/metrics.py:9) 5
{LOOP};receive_data (h2/connection.py:1) 5
0x7f (libc.so.6) 10
"""


def test_stacks_are_sorted_into_parts(tmp_path: Path) -> None:
    path = tmp_path / "node0.txt"
    path.write_text(STACKS)
    b = breakdown(read_collapsed(path))
    assert b.idle == 40 and b.total == 100
    shares = dict(b.shares())
    assert shares[WRITE_TO_PEER] == pytest.approx(0.20)
    assert shares[WRITE_TO_APP] == pytest.approx(0.30)
    assert shares["TLS: OpenSSL (encrypt, decrypt, records)"] == pytest.approx(0.15)
    assert shares["HBONE framing (hbone/connection.py)"] == pytest.approx(0.10)
    assert shares["access log, logging"] == pytest.approx(0.05)
    assert shares["telemetry (metrics, connection records)"] == pytest.approx(0.05)
    assert shares["h2 library (HPACK, control frames, windows)"] == pytest.approx(0.05)
    assert shares[OTHER] == pytest.approx(0.10)
    assert IDLE not in shares
    us = dict(b.us_per_request(200.0))
    assert us[WRITE_TO_APP] == pytest.approx(60.0)


def test_table_puts_before_and_after_side_by_side(tmp_path: Path) -> None:
    path = tmp_path / "p.txt"
    path.write_text(STACKS)
    b = breakdown(read_collapsed(path))
    rows = table([("before", b, 200.0), ("after", b, 100.0)])
    assert rows[0] == "| part of the request path | before, us | after, us |"
    assert f"| {WRITE_TO_APP} | 60.0 | 30.0 |" in rows
    assert rows[-1] == "| **all (CPU time per request)** | **200.0** | **100.0** |"


def test_leaf_decides_before_the_frames_above_it() -> None:
    stack = ["HboneProtocol._flush (ztunnel_py/proxy/transport.py:1)", "SSL_write_ex (libssl.so.3)"]
    assert classify(stack) == "TLS: OpenSSL (encrypt, decrypt, records)"
    assert classify(["x (foo.py:1)"]) == OTHER


def test_cpu_per_request_summary_and_ratio() -> None:
    samples = [
        Sample("before", 1, 1000, (100_000_000, 100_000_000), 300, 900),
        Sample("after", 1, 1000, (80_000_000, 80_000_000), 290, 800),
        Sample("before", 2, 1000, (110_000_000, 90_000_000), 310, 950),
        Sample("after", 2, 1000, (90_000_000, 70_000_000), 280, 850),
    ]
    assert samples[0].us_per_request == 200.0
    text = "\n".join(summarize(samples))
    assert "| before | 2 | 200.0 | 105.0 | 95.0 | 200.0, 200.0 |" in text
    assert "after / before: 0.800x CPU per request (-40.0 us)" in text


def test_code_trees_must_hold_the_package(tmp_path: Path) -> None:
    (tmp_path / "ztunnel_py").mkdir()
    (tmp_path / "ztunnel_py" / "__init__.py").write_text("")
    assert parse_code([f"base={tmp_path}"]) == [("base", tmp_path.resolve())]
    with pytest.raises(ValueError, match="LABEL=DIR"):
        parse_code(["nolabel"])
    with pytest.raises(ValueError, match="has no ztunnel_py package"):
        parse_code([f"x={tmp_path / 'missing'}"])
