"""The ZDS client: ztunnel's end of the istio-cni node agent's socket (``INPOD_UDS``).

The agent is the server. We connect (retrying with backoff from 10 ms up to 15 s), say hello,
and answer every request with an Ack once the pod handler has acted on it. When the agent
restarts, the connection ends; the pods we hold stay up, and the agent's snapshot on the next
connection tells us which of them are gone. The rules live in ``ZdsSession``
(``zds_protocol``); this module only moves packets and file descriptors.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import fcntl
import logging
import os
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from ztunnel_py.config import WorkloadInfo
from ztunnel_py.errors import ZtunnelError
from ztunnel_py.netns import CLONE_NEWNET
from ztunnel_py.redirect.zds_protocol import (
    MAX_MESSAGE_SIZE,
    AddPod,
    Backoff,
    PodAction,
    RemovePod,
    ZdsMessageError,
    ZdsSession,
    ZdsStep,
    decode_request,
    encode_ack,
    encode_hello,
)

log = logging.getLogger(__name__)

# Room for this many fds, so an agent passing several is reported instead of truncated.
MAX_FDS = 8
_NS_GET_NSTYPE = 0xB703  # _IO(0xb7, 0x3)


@dataclass(slots=True)
class Packet:
    data: bytes
    fds: list[int] = field(default_factory=list)
    flags: int = 0

    def close_fds(self) -> None:
        for fd in self.fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.fds.clear()


class SeqpacketChannel:
    """One connected AF_UNIX SOCK_SEQPACKET socket on the running loop: packets plus fds."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.sock = sock

    @classmethod
    async def connect(cls, path: Path | str) -> SeqpacketChannel:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        sock.setblocking(False)
        try:
            # A unix connect never stays in progress: EAGAIN means the backlog is full.
            sock.connect(str(path))
        except BaseException:
            sock.close()
            raise
        return cls(sock)

    async def recv(self, max_size: int = MAX_MESSAGE_SIZE, max_fds: int = MAX_FDS) -> Packet | None:
        """The next packet, or ``None`` at end of stream. Received fds are close-on-exec."""
        ancbuf = socket.CMSG_SPACE(max_fds * array.array("i").itemsize)
        while True:
            try:
                data, ancdata, flags, _ = self.sock.recvmsg(
                    max_size, ancbuf, socket.MSG_CMSG_CLOEXEC
                )
            except (BlockingIOError, InterruptedError):
                await self._wait(readable=True)
                continue
            packet = Packet(data, _fds_from(ancdata), flags)
            if not data and not packet.fds:
                # End of stream (an empty record reads the same; ztunnel treats both as EOF).
                return None
            return packet

    async def send(self, data: bytes, fds: Sequence[int] = ()) -> None:
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        while True:
            try:
                self.sock.sendmsg([data], anc)
                return
            except (BlockingIOError, InterruptedError):
                await self._wait(readable=False)

    def close(self) -> None:
        self.sock.close()

    async def _wait(self, *, readable: bool) -> None:
        fd = self.sock.fileno()
        if fd < 0:
            raise ConnectionError("the ZDS socket was closed")
        await wait_fd(fd, readable=readable)


async def wait_fd(fd: int, *, readable: bool = True) -> None:
    """Until ``fd`` is readable (or writable) on the running loop."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not fut.done():
            fut.set_result(None)

    if readable:
        loop.add_reader(fd, wake)
    else:
        loop.add_writer(fd, wake)
    try:
        await fut
    finally:
        if readable:
            loop.remove_reader(fd)
        else:
            loop.remove_writer(fd)


def _fds_from(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            arr = array.array("i")
            arr.frombytes(data[: len(data) - len(data) % arr.itemsize])
            fds.extend(arr)
    return fds


def is_netns_fd(fd: int) -> bool:
    """Whether ``fd`` refers to a network namespace (NS_GET_NSTYPE, Linux 4.11+)."""
    try:
        return fcntl.ioctl(fd, _NS_GET_NSTYPE) == CLONE_NEWNET
    except OSError:
        return False


class PodHandler(Protocol):
    """Acts on the pods ZDS names (the in-pod workload manager)."""

    async def enroll(self, uid: str, info: WorkloadInfo, netns_fd: int) -> None:
        """Start (or keep) the pod's proxy. Takes ownership of ``netns_fd`` in every case.

        Raises ``ZtunnelError``/``OSError`` when the proxy could not start; the pod must then
        stay pending (and be retried), and the agent gets a NACK with the reason.
        """
        ...

    async def remove(self, uid: str) -> None: ...


class ZdsClient:
    """Connects to the agent, serves one connection at a time, reconnects until closed."""

    def __init__(
        self,
        path: Path | str,
        handler: PodHandler,
        *,
        session: ZdsSession | None = None,
        backoff: Backoff | None = None,
        on_ready: Callable[[bool], None] | None = None,
    ) -> None:
        self.path = Path(path)
        self.handler = handler
        self.session = session or ZdsSession()
        self.backoff = backoff or Backoff()
        self.on_ready = on_ready
        self.connections = 0  # connections that got as far as the hello
        self._ready = False
        self._channel: SeqpacketChannel | None = None
        self._closed = asyncio.Event()
        self._ready_event = asyncio.Event()

    @property
    def ready(self) -> bool:
        return self._ready

    async def wait_ready(self) -> None:
        await self._ready_event.wait()

    async def run(self) -> None:
        """Serve the agent until ``close()`` (or cancellation)."""
        try:
            while not self._closed.is_set():
                try:
                    channel = await SeqpacketChannel.connect(self.path)
                except OSError as e:
                    delay = self.backoff.next()
                    log.warning(
                        "failed to connect to the Istio CNI node agent over %s, is the node agent "
                        "healthy? (%s); retrying in %.3fs",
                        self.path,
                        e.strerror or e,
                        delay,
                    )
                    await self._sleep(delay)
                    continue
                self._channel = channel
                try:
                    await self._serve(channel)
                except OSError as e:
                    log.warning("connection to the node agent failed: %s", e)
                finally:
                    channel.close()
                    self._channel = None
                    self.session.disconnected()
                    self._set_ready(False)
                await self._sleep(self.backoff.next())
        finally:
            self._set_ready(False)

    def close(self) -> None:
        """Stop reconnecting and end the current connection (``run()`` then returns)."""
        self._closed.set()
        if self._channel is not None:
            # shutdown wakes a pending recv with EOF; close() alone would leave it waiting.
            with contextlib.suppress(OSError):
                self._channel.sock.shutdown(socket.SHUT_RDWR)

    async def _sleep(self, delay: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._closed.wait(), delay)

    async def _serve(self, channel: SeqpacketChannel) -> None:
        self.session.connected()
        await channel.send(encode_hello())
        self.connections += 1
        log.info("connected to the node agent at %s", self.path)
        while True:
            packet = await channel.recv()
            if packet is None:
                log.info("node agent closed the connection")
                return
            step = self._decode(packet)
            error = step.error
            for action in step.actions:
                failure = await self._act(action)
                if failure and not error:
                    error = failure
            await channel.send(encode_ack(error))
            if self.session.ready:
                self.backoff.reset()
            self._set_ready(self.session.ready)
            if step.disconnect:
                log.error("ending the node agent connection after: %s", error)
                return

    def _decode(self, packet: Packet) -> ZdsStep:
        try:
            request = decode_request(packet.data, packet.fds, packet.flags)
            if isinstance(request, AddPod) and not is_netns_fd(request.netns_fd):
                raise ZdsMessageError(
                    f"add for pod {request.uid!r}: the fd is not a network namespace"
                )
        except ZdsMessageError as e:
            packet.close_fds()
            log.error("bad message from the node agent: %s", e)
            return self.session.unreadable(str(e))
        return self.session.receive(request)

    async def _act(self, action: PodAction) -> str:
        """Run one action; the NACK text if it failed, else empty."""
        if isinstance(action, RemovePod):
            log.info(
                "pod delete request, shutting down proxy", extra={"fields": {"uid": action.uid}}
            )
            try:
                await self.handler.remove(action.uid)
            except (ZtunnelError, OSError) as e:
                log.error("failed to remove pod %s: %s", action.uid, e)
            return ""
        log.info(
            "pod received, starting proxy",
            extra={
                "fields": {
                    "uid": action.uid,
                    "name": action.info.name,
                    "namespace": action.info.namespace,
                }
            },
        )
        try:
            await self.handler.enroll(action.uid, action.info, action.netns_fd)
        except (ZtunnelError, OSError) as e:
            log.error("failed to start proxy for pod %s: %s", action.uid, e)
            return f"failure to start proxy: {e}"
        return ""

    def _set_ready(self, ready: bool) -> None:
        if ready:
            self._ready_event.set()
        else:
            self._ready_event.clear()
        if ready != self._ready:
            self._ready = ready
            if self.on_ready is not None:
                self.on_ready(ready)
