"""A fake istio-cni node agent: the ZDS *server*, over the real socket type, with real netns fds.

It behaves as istio-cni's ``ztunnelserver`` does where a test can see it: it listens on a unix
SOCK_SEQPACKET socket, expects ``ZdsHello{V1}`` from each connecting ztunnel, replays every pod
it knows (``add`` carrying the pod's netns fd opened from ``/run/netns/<name>``, or ``keep`` for
a pod whose netns it no longer holds), sends ``snapshot_sent``, and then sends ``add``/``del`` as
the test asks. Each request waits for its Ack with the CNI's 5 s deadline; a missed deadline ends
that connection. Runtime requests go to the newest connection, as the CNI's do.

``stop()``/``start()`` (or ``restart()``) simulate an agent restart; the pod cache survives it,
so a test can drop a pod "while the agent was down" and check that the snapshot removes it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ztunnel_py.config import WorkloadInfo
from ztunnel_py.protos import zds_pb2
from ztunnel_py.redirect.zds import Packet, SeqpacketChannel, wait_fd
from ztunnel_py.redirect.zds_protocol import (
    ACK_DEADLINE_S,
    ZdsError,
    ZdsMessageError,
    decode_ack,
    decode_hello,
    encode_add,
    encode_del,
    encode_keep,
    encode_snapshot_sent,
)

log = logging.getLogger(__name__)


class AgentError(ZdsError):
    """The ztunnel on the other end did not answer as the protocol requires."""


@dataclass(slots=True)
class AgentPod:
    uid: str
    info: WorkloadInfo
    netns_path: Path | None  # None: the agent lost the netns; the snapshot says "keep"


@dataclass(slots=True)
class _Conn:
    channel: SeqpacketChannel
    number: int
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    inbox: asyncio.Queue[Packet | None] = field(default_factory=asyncio.Queue)
    snapshot_done: bool = False
    alive: bool = True


class FakeCniAgent:
    def __init__(self, path: Path | str, *, ack_deadline_s: float = ACK_DEADLINE_S) -> None:
        self.path = Path(path)
        self.ack_deadline_s = ack_deadline_s
        self.pods: dict[str, AgentPod] = {}
        self.acks: list[tuple[str, str]] = []  # (request, ack error) in arrival order
        self.connections_seen = 0
        self.snapshots_acked = 0
        self._listener: socket.socket | None = None
        self._accept_task: asyncio.Task[None] | None = None
        self._conn_tasks: set[asyncio.Task[None]] = set()
        self._conns: list[_Conn] = []
        self._changed = asyncio.Condition()

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        if self._listener is not None:
            return
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        sock.bind(str(self.path))
        sock.listen(16)
        sock.setblocking(False)
        self._listener = sock
        self._accept_task = asyncio.get_running_loop().create_task(self._accept_loop(sock))

    async def stop(self) -> None:
        """Stop like a crashed/restarted agent: listener gone, every connection closed."""
        if self._accept_task is not None:
            self._accept_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._accept_task
            self._accept_task = None
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        await self.drop_connections()

    async def restart(self, *, drop: Iterable[str] = ()) -> None:
        """Stop, forget the pods in ``drop`` (deleted "while down"), start again."""
        await self.stop()
        for uid in drop:
            self.pods.pop(uid, None)
        await self.start()

    async def drop_connections(self) -> None:
        """Close every ztunnel connection (the agent side of a broken socket)."""
        for conn in self._conns:
            conn.alive = False
            with contextlib.suppress(OSError):
                conn.channel.sock.shutdown(socket.SHUT_RDWR)
        for task in list(self._conn_tasks):
            task.cancel()
        for task in list(self._conn_tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for conn in self._conns:
            conn.channel.close()
        self._conns.clear()
        await self._notify()

    # ------------------------------------------------------------------ pods at runtime

    async def add_pod(self, uid: str, info: WorkloadInfo, netns_path: Path | str) -> str | None:
        """Cache the pod and, if a ztunnel is connected, send ``add``; its ack error or None."""
        self.pods[uid] = AgentPod(uid, info, Path(netns_path))
        conn = self._live_conn()
        if conn is None:
            return None
        async with conn.lock:
            return await self._request_add(conn, self.pods[uid])

    async def del_pod(self, uid: str) -> str | None:
        self.pods.pop(uid, None)
        conn = self._live_conn()
        if conn is None:
            return None
        async with conn.lock:
            return await self._request(conn, f"del {uid}", encode_del(uid))

    def forget_netns(self, uid: str) -> None:
        """The agent no longer holds this pod's netns: its snapshot entry becomes ``keep``."""
        self.pods[uid].netns_path = None

    async def send_raw(self, data: bytes, fds: Sequence[int] = (), what: str = "raw") -> str:
        """Send any packet on the newest connection and return the ack error it got."""
        conn = self._live_conn()
        if conn is None:
            raise AgentError("no ztunnel is connected")
        async with conn.lock:
            return await self._request(conn, what, data, fds)

    # ------------------------------------------------------------------ waiting

    async def wait_snapshots(self, count: int) -> None:
        """Until ``count`` snapshots (over all connections) have been acked."""
        async with self._changed:
            await self._changed.wait_for(lambda: self.snapshots_acked >= count)

    async def wait_disconnected(self) -> None:
        async with self._changed:
            await self._changed.wait_for(lambda: not any(c.alive for c in self._conns))

    @property
    def connected(self) -> bool:
        return self._live_conn() is not None

    # ------------------------------------------------------------------ internals

    def _live_conn(self) -> _Conn | None:
        for conn in reversed(self._conns):
            if conn.alive and conn.snapshot_done:
                return conn
        return None

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def _accept_loop(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                sock, _ = listener.accept()
            except (BlockingIOError, InterruptedError):
                await wait_fd(listener.fileno())
                continue
            sock.set_inheritable(False)
            self.connections_seen += 1
            conn = _Conn(SeqpacketChannel(sock), self.connections_seen)
            self._conns.append(conn)
            task = loop.create_task(self._serve(conn))
            self._conn_tasks.add(task)
            task.add_done_callback(self._conn_tasks.discard)
            await self._notify()

    async def _serve(self, conn: _Conn) -> None:
        reader = asyncio.get_running_loop().create_task(self._read_loop(conn))
        try:
            async with conn.lock:
                packet = await asyncio.wait_for(conn.inbox.get(), self.ack_deadline_s)
                if packet is None:
                    raise AgentError("ztunnel closed the connection before saying hello")
                packet.close_fds()
                version = decode_hello(packet.data)
                if version != zds_pb2.V1:
                    raise AgentError(f"ztunnel announced ZDS version {version}, expected V1")
                for pod in list(self.pods.values()):
                    if pod.netns_path is None:
                        await self._request(conn, f"keep {pod.uid}", encode_keep(pod.uid))
                    else:
                        await self._request_add(conn, pod)
                await self._request(conn, "snapshot_sent", encode_snapshot_sent())
                conn.snapshot_done = True
                self.snapshots_acked += 1
            await self._notify()
            await reader  # until ztunnel closes its end
        except (AgentError, ZdsMessageError, TimeoutError, OSError) as e:
            log.warning("fake CNI agent: connection %d ended: %s", conn.number, e)
        finally:
            reader.cancel()
            conn.alive = False
            conn.channel.close()
            await self._notify()

    async def _read_loop(self, conn: _Conn) -> None:
        """Every packet from ztunnel goes to the inbox; ``None`` marks the end of the stream."""
        try:
            while (packet := await conn.channel.recv()) is not None:
                conn.inbox.put_nowait(packet)
        except OSError as e:
            log.info("fake CNI agent: connection %d read failed: %s", conn.number, e)
        finally:
            conn.inbox.put_nowait(None)

    async def _request_add(self, conn: _Conn, pod: AgentPod) -> str:
        assert pod.netns_path is not None
        fd = os.open(pod.netns_path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            return await self._request(conn, f"add {pod.uid}", encode_add(pod.uid, pod.info), [fd])
        finally:
            os.close(fd)  # the receiver has its own copy now

    async def _request(self, conn: _Conn, what: str, data: bytes, fds: Sequence[int] = ()) -> str:
        while not conn.inbox.empty():
            stale = conn.inbox.get_nowait()
            if stale is None:
                conn.inbox.put_nowait(None)
                break
            stale.close_fds()
            log.warning(
                "fake CNI agent: unsolicited packet from ztunnel (%d bytes)", len(stale.data)
            )
        try:
            await asyncio.wait_for(conn.channel.send(data, fds), self.ack_deadline_s)
            packet = await asyncio.wait_for(conn.inbox.get(), self.ack_deadline_s)
        except (TimeoutError, OSError):
            conn.alive = False
            raise
        if packet is None:
            conn.alive = False
            conn.inbox.put_nowait(None)
            raise AgentError(f"ztunnel closed the connection instead of acking {what}")
        packet.close_fds()
        error = decode_ack(packet.data)
        self.acks.append((what, error))
        if error:
            log.info("fake CNI agent: %s NACKed: %s", what, error)
        return error
