"""Shared plumbing of the three servers: upstream TCP connects and per-connection bookkeeping."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import logging
import random
import socket
from collections.abc import Callable, Coroutine
from typing import Any, Protocol

from ztunnel_py.hbone.headers import format_authority
from ztunnel_py.proxy.errors import UpstreamConnectError
from ztunnel_py.proxy.sockets import SocketFactory
from ztunnel_py.proxy.splice import TcpSide
from ztunnel_py.state.model import IPAddress, SocketAddr

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 10.0
TLS_HANDSHAKE_TIMEOUT_S = 10.0
# asyncio re-listens a socket passed to create_server, with a backlog of 100 by default.
LISTEN_BACKLOG = 4096


def sockaddr(raw: Any) -> SocketAddr:
    """asyncio's peername/sockname tuple -> (ip, port); IPv4-mapped IPv6 becomes IPv4."""
    ip = ipaddress.ip_address(str(raw[0]).split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped, int(raw[1])
    return ip, int(raw[1])


def family_of(ip: IPAddress) -> int:
    return socket.AF_INET6 if ip.version == 6 else socket.AF_INET


async def connect_socket(
    sockets: SocketFactory,
    target: SocketAddr,
    *,
    source: IPAddress | None = None,
    timeout_s: float = CONNECT_TIMEOUT_S,
    hbone: bool = False,
    source_ports: range | None = None,
) -> socket.socket:
    """A connected non-blocking socket to ``target``, or ``UpstreamConnectError``.

    ``source_ports``: bind a source port from this range (the first one free for this
    destination, from a random start)."""
    if source_ports is None:
        return await _connect_once(sockets, target, source, 0, timeout_s, hbone)
    start = random.randrange(len(source_ports))
    for i in range(len(source_ports)):
        port = source_ports[(start + i) % len(source_ports)]
        try:
            return await _connect_once(sockets, target, source, port, timeout_s, hbone)
        except _SourcePortTaken:
            continue
    raise UpstreamConnectError(
        format_authority(*target),
        f"every source port {source_ports.start}-{source_ports.stop - 1} is in use towards it",
        hbone=hbone,
    )


class _SourcePortTaken(Exception):
    pass


async def _connect_once(
    sockets: SocketFactory,
    target: SocketAddr,
    source: IPAddress | None,
    source_port: int,
    timeout_s: float,
    hbone: bool,
) -> socket.socket:
    ip, port = target
    try:
        sock = sockets.upstream_socket(family_of(ip), source=source, port=source_port)
    except OSError as e:
        if source_port and e.errno == errno.EADDRINUSE:
            raise _SourcePortTaken from None
        raise
    loop = asyncio.get_running_loop()
    where = format_authority(ip, port)
    try:
        try:
            async with asyncio.timeout(timeout_s):
                await loop.sock_connect(sock, (str(ip), port))
        finally:
            sockets.connected(sock)
    except TimeoutError:
        sock.close()
        raise UpstreamConnectError(
            where, f"connection timed out after {timeout_s:g}s", hbone=hbone
        ) from None
    except OSError as e:
        sock.close()
        if source_port and e.errno in (errno.EADDRNOTAVAIL, errno.EADDRINUSE):
            raise _SourcePortTaken from None  # that 4-tuple is taken: another port
        reason = "connection refused" if isinstance(e, ConnectionRefusedError) else str(e)
        raise UpstreamConnectError(where, reason, hbone=hbone) from None
    except BaseException:
        sock.close()
        raise
    return sock


async def connect_tcp(
    sockets: SocketFactory,
    target: SocketAddr,
    *,
    source: IPAddress | None = None,
    timeout_s: float = CONNECT_TIMEOUT_S,
    preface: bytes = b"",
) -> TcpSide:
    """A (paused) ``TcpSide`` connected to ``target``, ``preface`` (a PROXY header) already
    sent on it; ``UpstreamConnectError`` or ``OSError``."""
    sock = await connect_socket(sockets, target, source=source, timeout_s=timeout_s)
    side = TcpSide()
    loop = asyncio.get_running_loop()
    try:
        if preface:
            async with asyncio.timeout(timeout_s):
                await loop.sock_sendall(sock, preface)
        await loop.create_connection(lambda: side, sock=sock)
    except BaseException:
        sock.close()
        raise
    return side


class Splice(Protocol):
    """A live connection a draining server can cut (``HboneSplice``, ``TcpSplice``, or the
    kernel splice)."""

    def abort(self, reason: str) -> None: ...


class AcceptedSide(TcpSide):
    """A connection accepted by a plain TCP listener, served by ``handler`` in its own task."""

    def __init__(
        self,
        connections: ServerConnections,
        handler: Callable[[AcceptedSide], Coroutine[Any, Any, None]],
    ) -> None:
        super().__init__()
        self._connections = connections
        self._handler = handler

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._connections.spawn(self._handler(self))


class ServerConnections:
    """The tasks and live splices of one server, for draining and for tests."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.tasks: set[asyncio.Task[None]] = set()
        self.splices: set[Splice] = set()
        self.handled = 0

    def spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(self._guard(coro))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        # Cancelled before it ran (a stream reset at once): close the coroutine it never awaited.
        task.add_done_callback(lambda _: coro.close())
        self.handled += 1
        return task

    async def _guard(self, coro: Coroutine[Any, Any, None]) -> None:
        try:
            await coro
        except asyncio.CancelledError:
            raise
        except Exception:  # one connection's bug must not take the server down
            log.exception("%s: connection handler failed", self.name)

    @contextlib.contextmanager
    def tracking(self, splice: Splice) -> Any:
        self.splices.add(splice)
        try:
            yield splice
        finally:
            self.splices.discard(splice)

    async def drain(self, deadline_s: float) -> None:
        """Wait up to ``deadline_s`` for connections to finish, then abort the rest."""
        if self.tasks:
            await asyncio.wait(list(self.tasks), timeout=deadline_s)
        for splice in list(self.splices):
            splice.abort("connection closed: proxy is shutting down")
        for task in list(self.tasks):
            task.cancel()
        if self.tasks:
            await asyncio.wait(list(self.tasks), timeout=1.0)
