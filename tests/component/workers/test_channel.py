"""The control plane <-> worker channel: framed messages with file descriptors beside them."""

from __future__ import annotations

import asyncio
import os
import socket

import pytest

from tests.unit.state.test_store import wl
from ztunnel_py.state.store import UpdateBatch
from ztunnel_py.workers import messages as m
from ztunnel_py.workers.channel import MAX_FRAME, Channel, ChannelClosed


@pytest.mark.asyncio
async def test_messages_arrive_in_order_with_their_descriptors() -> None:
    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    sender, receiver = Channel(left), Channel(right)
    r, w = os.pipe()
    try:
        # Model objects hold read-only mappings (mappingproxy), which pickle cannot do alone.
        batch = UpdateBatch(
            workloads=tuple(
                wl(f"w{i}", ips=(f"10.0.{i // 250}.{i % 250 + 1}",)) for i in range(2000)
            )
        )
        big = asyncio.create_task(sender.send(m.ApplyState(batch)))  # larger than the buffer
        got, fds = await receiver.receive()
        await big
        assert got == m.ApplyState(batch) and fds == []

        await sender.send(m.StopPod("pod", 1.0), (w,))
        await sender.send(m.Collect(7))
        got, fds = await receiver.receive()
        assert got == m.StopPod("pod", 1.0)
        (passed,) = fds
        os.write(passed, b"through the copy")
        assert os.read(r, 64) == b"through the copy"
        os.close(passed)
        assert await receiver.receive() == (m.Collect(7), [])
    finally:
        sender.close()
        receiver.close()
        os.close(r)
        os.close(w)


@pytest.mark.asyncio
async def test_a_closed_or_garbled_peer_ends_the_channel() -> None:
    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    receiver = Channel(right)
    try:
        left.sendall((MAX_FRAME + 1).to_bytes(4, "big") + b"\0\0")
        with pytest.raises(ChannelClosed, match="bad frame"):
            await receiver.receive()
        mine, gone = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        gone.close()
        orphan = Channel(mine)
        with pytest.raises(ChannelClosed):
            await orphan.receive()
        orphan.close()
    finally:
        left.close()
        receiver.close()
