"""Bytes a failed kernel splice already moved are counted by the splice that takes over."""

from __future__ import annotations

import pytest

from ztunnel_py.proxy.splice import HboneSplice, TcpSide, TcpSplice


@pytest.mark.asyncio
async def test_an_hbone_splice_counts_what_its_side_read_and_was_written_before_attach() -> None:
    side = TcpSide()
    side.credit(read=700, written=11)
    side.put_back_early(b"tail")  # not written by the kernel splice: replayed, counted once
    splice = HboneSplice(side)
    splice.start()  # no stream bound: the replayed bytes go nowhere but are not counted
    assert (splice.bytes_in, splice.bytes_out) == (700, 11)


@pytest.mark.asyncio
async def test_a_tcp_splice_counts_each_credited_byte_once() -> None:
    a, b = TcpSide(), TcpSide()
    a.credit(read=5, written=9)  # what b's credit reads, seen from a
    b.credit(read=9, written=5)
    splice = TcpSplice(a, b)
    splice.start()
    assert (splice.bytes_in, splice.bytes_out) == (5, 9)
    again = TcpSplice(a, b)  # a credit is counted by one attach only
    again.start()
    assert (again.bytes_in, again.bytes_out) == (0, 0)
