"""Messages and file descriptors between the control plane and a worker, over a unix socket.

Frames are ``!IH`` (payload length, descriptor count) then a pickle of one ``messages``
dataclass; the descriptors ride as ``SCM_RIGHTS`` on the frame's first bytes. Both ends are
processes of the same installation started by the control plane (a socketpair, reachable by
no one else), so pickle is the format; model mappings (read-only proxies) are pickled as dicts.
"""

from __future__ import annotations

import array
import asyncio
import collections
import copyreg
import io
import os
import pickle
import socket
import struct
from types import MappingProxyType
from typing import Any

_HEADER = struct.Struct("!IH")
MAX_FRAME = 256 * 1024 * 1024  # a state snapshot of a very large mesh fits; garbage does not
MAX_FDS = 16
_READ = 256 * 1024


class ChannelClosed(EOFError):
    """The other process closed its end (it exited, or was killed)."""


def _mapping_proxy(items: dict[Any, Any]) -> MappingProxyType[Any, Any]:
    return MappingProxyType(items)


def _reduce_mapping_proxy(m: MappingProxyType[Any, Any]) -> tuple[Any, tuple[dict[Any, Any]]]:
    return _mapping_proxy, (dict(m),)


class _Pickler(pickle.Pickler):
    dispatch_table = copyreg.dispatch_table.copy()
    dispatch_table[MappingProxyType] = _reduce_mapping_proxy


def encode(message: object) -> bytes:
    buf = io.BytesIO()
    _Pickler(buf, protocol=pickle.HIGHEST_PROTOCOL).dump(message)
    return buf.getvalue()


class Channel:
    """One end of the socketpair, driven by the running event loop."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.sock = sock
        self._buffer = bytearray()
        self._fds: collections.deque[int] = collections.deque()
        self._send_lock = asyncio.Lock()
        self._closed = False

    async def send(self, message: object, fds: tuple[int, ...] = ()) -> None:
        payload = encode(message)
        frame = _HEADER.pack(len(payload), len(fds)) + payload
        async with self._send_lock:
            view = memoryview(frame)
            ancillary = (
                [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
            )
            while view:
                try:
                    sent = self.sock.sendmsg([view], ancillary)
                except BlockingIOError:
                    await self._wait(writable=True)
                    continue
                except OSError as e:
                    raise ChannelClosed(str(e)) from e
                ancillary = []  # the descriptors went with the first bytes
                view = view[sent:]

    async def receive(self) -> tuple[Any, list[int]]:
        """The next message and the descriptors that came with it (the caller owns them)."""
        while True:
            frame = self._next_frame()
            if frame is not None:
                return frame
            try:
                data, ancdata, _flags, _addr = self.sock.recvmsg(
                    _READ, socket.CMSG_SPACE(MAX_FDS * 4)
                )
            except BlockingIOError:
                await self._wait(writable=False)
                continue
            except OSError as e:
                raise ChannelClosed(str(e)) from e
            for level, kind, blob in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds = array.array("i")
                    fds.frombytes(blob[: len(blob) - len(blob) % fds.itemsize])
                    self._fds.extend(fds)
            if not data:
                raise ChannelClosed("the other end closed the channel")
            self._buffer += data

    def _next_frame(self) -> tuple[Any, list[int]] | None:
        if len(self._buffer) < _HEADER.size:
            return None
        length, nfds = _HEADER.unpack_from(self._buffer)
        if length > MAX_FRAME or nfds > MAX_FDS:
            raise ChannelClosed(f"bad frame (length {length}, {nfds} descriptors)")
        end = _HEADER.size + length
        if len(self._buffer) < end or len(self._fds) < nfds:
            return None
        message = pickle.loads(self._buffer[_HEADER.size : end])  # noqa: S301 (our own process)
        del self._buffer[:end]
        return message, [self._fds.popleft() for _ in range(nfds)]

    async def _wait(self, *, writable: bool) -> None:
        loop = asyncio.get_running_loop()
        ready = loop.create_future()
        fd = self.sock.fileno()
        if fd < 0:
            raise ChannelClosed("channel closed")

        def wake() -> None:
            if not ready.done():
                ready.set_result(None)

        if writable:
            loop.add_writer(fd, wake)
        else:
            loop.add_reader(fd, wake)
        try:
            await ready
        finally:
            if writable:
                loop.remove_writer(fd)
            else:
                loop.remove_reader(fd)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for fd in self._fds:
            os.close(fd)
        self._fds.clear()
        self.sock.close()
