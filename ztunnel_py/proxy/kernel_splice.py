"""The kernel splice of same-node connections: bytes between two pods of this node skip Python.

A connection from a pod to a pod of the same node reaches the daemon twice: its outbound side
accepts the application's connection on the source pod's :15001 and opens an HBONE stream to
the destination pod's :15008, which the daemon's inbound side serves (mTLS, authorization, a
plain TCP connection to the application). Once that is done the daemon holds two plain TCP
sockets of one connection, the accepted one and the one to the application, and the HBONE
stream between them carries nothing the kernel could not carry itself.

So the outbound side *offers* its accepted socket under the stream's key (the HBONE
connection's addresses and the stream id); the inbound side, after authorization passed and
the application answered, *claims* the offer, and both sockets go into the BPF sockhashes of
``bpf.splice``: the kernel sends what one receives out of the other and counts it. Nothing has
been read from either socket by then (both sides read nothing until spliced), so no byte is
in flight in Python. When the offer is not there (another worker process, a pool race, the
splice off or full), the inbound side splices in Python as always and the outbound side
withdraws its offer on the 200.

The proxy does not watch spliced sockets for input: a socket whose bytes the kernel is sending
on polls readable, which would wake the daemon for every message. It watches them for FIN and
errors only (EPOLLRDHUP, EPOLLERR, in an epoll set of its own), and the program announces a
socket that starts handing data up in a ring buffer (``SpliceMaps.handed_up_sockets``).

What stays in Python, per direction (``_Direction``):

* FIN: the source turns readable with an EOF; once the destination holds every byte the kernel
  sent on (its TCP state: acknowledged plus queued), the destination is shut for writing;
* RST (or any error): both connections are reset, as the Python splice does;
* backpressure: the program stops sending on when the destination's receiver is ``window``
  bytes behind and passes the data up instead; the source turns readable, the proxy stops the
  program on it, waits for the destination to catch up, moves what was passed up (the only
  bytes Python ever copies here, counted in ``copied``) and resumes the kernel;
* the live policy check: ``abort`` (conntrack's close) resets both connections.

Both sides report the connection to telemetry with the kernel's counters (``bytes_in`` and
``bytes_out`` read the map, so scrapes see live connections grow).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import select
import socket
import struct
from dataclasses import dataclass, field
from typing import Any

from ztunnel_py.bpf.errors import BpfError, LibbpfError, MapFull
from ztunnel_py.bpf.splice import Pairing, SpliceMaps, handed_up_bytes, tcp_progress
from ztunnel_py.proxy.splice import SpliceResult, TcpSide, error_text
from ztunnel_py.proxy.tcp import sockaddr
from ztunnel_py.proxy.transport import HboneProtocol
from ztunnel_py.state.model import SocketAddr

log = logging.getLogger(__name__)

# How far a destination's receiver may fall behind before the kernel hands data back to us.
DEFAULT_WINDOW_BYTES = 8 * 1024 * 1024
# The most one read moves during a takeover.
_TAKEOVER_CHUNK = 256 * 1024
_DRAIN_POLL_FIRST_S = 0.001
_DRAIN_POLL_MAX_S = 0.05
# What a spliced socket is watched for: the peer's FIN, errors (EPOLLERR, EPOLLHUP: always).
_FIN_OR_ERROR = select.EPOLLRDHUP
# A socket that reports an event with nothing to read (a kernel whose bytes in transit make it
# look readable) is watched again only after a pause, doubled while it lasts: readiness is
# level-triggered, and looking again at once would loop.
_QUIET_FIRST_S = 0.001
_QUIET_MAX_S = 0.004
_LINGER_RST = struct.pack("ii", 1, 0)
SO_SNDBUFFORCE = 32  # Linux; not in Python's socket module

# (source address, destination address, stream id) of an HBONE stream, as both sides see it.
StreamKey = tuple[SocketAddr, SocketAddr, int]


class _Direction:
    """One direction of a spliced connection: bytes received on ``src`` leave from ``dst``."""

    def __init__(
        self, src: socket.socket, dst: socket.socket, src_cookie: int, dst_base: int
    ) -> None:
        self.src = src
        self.dst = dst
        self.src_cookie = src_cookie
        self.peer_cookie = 0
        self.dst_base = dst_base  # written into dst before the splice (its SYN)
        self.copied = 0  # handed up by the program and moved by the proxy (takeovers)
        self.early = 0  # read by the proxy before the splice, written by it before the pair
        self.final_sent: int | None = None  # the kernel's count, kept once forgotten
        self.finished = False  # EOF propagated
        self.task: asyncio.Task[None] | None = None
        self.quiet = _QUIET_FIRST_S  # pause after a readiness with nothing to read
        self.rearm: asyncio.TimerHandle | None = None


class KernelSplice:
    """One connection spliced in the kernel; ``done`` resolves like a ``TcpSplice``'s.

    ``a`` is the source side (the application that connected), ``b`` the destination's:
    ``bytes_in`` were read from ``a``, ``bytes_out`` from ``b``.
    """

    def __init__(
        self,
        splicer: KernelSplicer,
        maps: SpliceMaps,
        a: socket.socket,
        b: socket.socket,
        pairing: Pairing,
        window: int,
        *,
        early: tuple[bytes, bytes] = (b"", b""),
    ) -> None:
        self._splicer = splicer
        self._maps = maps
        self._a = a
        self._b = b
        self._window = window
        self._loop = asyncio.get_running_loop()
        self._forward = _Direction(a, b, pairing.cookie_a, pairing.base_b)
        self._back = _Direction(b, a, pairing.cookie_b, pairing.base_a)
        self._forward.peer_cookie = pairing.cookie_b
        self._back.peer_cookie = pairing.cookie_a
        self._forward.early = len(early[0])
        self._back.early = len(early[1])
        splicer.copied_bytes += len(early[0]) + len(early[1])
        self.done: asyncio.Future[SpliceResult] = self._loop.create_future()
        for d in (self._forward, self._back):
            splicer._track(self, d)

    # ------------------------------------------------------------------ counters

    def _sent(self, d: _Direction) -> int:
        kernel = d.final_sent if d.final_sent is not None else self._maps.sent(d.src_cookie)
        return kernel + d.copied + d.early

    @property
    def bytes_in(self) -> int:
        return self._sent(self._forward)

    @property
    def bytes_out(self) -> int:
        return self._sent(self._back)

    @property
    def copied(self) -> int:
        """Bytes the proxy moved itself (read before the splice, takeovers)."""
        return sum(d.copied + d.early for d in (self._forward, self._back))

    # ------------------------------------------------------------------ events

    def _busy(self, d: _Direction) -> bool:
        return self.done.done() or d.finished or (d.task is not None and not d.task.done())

    def _readable(self, d: _Direction) -> None:
        """The source has an EOF, an error, or data the kernel handed up."""
        if self._busy(d):
            return
        try:
            peek = d.src.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            self._watch_later(d)
            return
        except OSError as e:
            self._reset(error_text(e))
            return
        d.quiet = _QUIET_FIRST_S
        self._splicer._unwatch(d)
        work = self._take_over(d) if peek else self._propagate_eof(d)
        d.task = self._loop.create_task(work)

    def _handed_up(self, d: _Direction) -> None:
        """The program announced that ``d``'s source started handing data up."""
        if self._busy(d):
            return  # a takeover or the EOF in progress moves what was handed up
        self._splicer._unwatch(d)
        d.task = self._loop.create_task(self._take_over(d))

    def _watch_later(self, d: _Direction) -> None:
        """An event with nothing to read (see ``_QUIET_FIRST_S``): look again after a pause."""
        self._splicer._unwatch(d)
        self._splicer.quiet_wakeups += 1
        d.rearm = self._loop.call_later(d.quiet, self._watch, d)
        d.quiet = min(d.quiet * 2, _QUIET_MAX_S)

    def _watch(self, d: _Direction) -> None:
        d.rearm = None
        if not self.done.done():
            self._splicer._watch(d)

    async def _caught_up(self, d: _Direction) -> bool:
        """Wait until ``dst`` holds everything sent on to it; False if it closed meanwhile."""
        delay = _DRAIN_POLL_FIRST_S
        while True:
            progress = tcp_progress(d.dst)
            if progress.closed:
                return False
            if progress.written - d.dst_base >= self._maps.sent(d.src_cookie) + d.copied:
                return True
            await asyncio.sleep(delay)
            delay = min(delay * 2, _DRAIN_POLL_MAX_S)

    async def _take_over(self, d: _Direction) -> None:
        try:
            self._maps.stop(d.src, d.src_cookie)  # new data now waits in src's queue, in order
            if not await self._caught_up(d):
                self._reset("connection reset by peer")
                return
            entry = self._maps.conn(d.src_cookie)
            if entry is None:
                raise BpfError("the connection's zt_splice_conns entry is gone")
            await self._move(d, int(entry.passed))
            self._maps.set_conn(
                d.src_cookie,
                peer=d.peer_cookie,
                sent=int(entry.bytes),
                passed=0,  # all moved: the kernel may send on again
                peer_base=d.dst_base + d.copied,  # what dst acknowledges beyond the kernel's
                window=self._window,
            )
            self._maps.resume(d.src, d.src_cookie)
            self._splicer.takeovers += 1
            self._splicer._watch(d)
        except OSError as e:
            self._reset(error_text(e))
        except (BpfError, LibbpfError) as e:
            log.warning("kernel splice lost a connection's map entry: %s", e)
            self._reset(f"kernel splice failed: {e}")

    async def _move(self, d: _Direction, pending: int) -> None:
        """Copy the ``pending`` bytes the program handed up on ``src`` to ``dst``, in order.

        Only those: they sit in src's psock queue, possibly not all there yet (the kernel
        moves them from a backlog), while newer data may already wait in its TCP receive
        queue, which a read would return whenever the psock queue is momentarily empty. So
        each read takes no more than what the psock queue holds (FIONREAD); the newer data is
        left to the kernel once it resumes."""
        delay = _DRAIN_POLL_FIRST_S
        while pending > 0:
            ready = min(handed_up_bytes(d.src), pending, _TAKEOVER_CHUNK)
            if ready <= 0:
                await asyncio.sleep(delay)
                delay = min(delay * 2, _DRAIN_POLL_MAX_S)
                continue
            delay = _DRAIN_POLL_FIRST_S
            chunk = d.src.recv(ready)
            if not chunk:
                raise ConnectionResetError("connection closed with handed-up bytes unread")
            await self._loop.sock_sendall(d.dst, chunk)
            d.copied += len(chunk)
            self._splicer.copied_bytes += len(chunk)
            pending -= len(chunk)

    async def _propagate_eof(self, d: _Direction) -> None:
        try:
            if not await self._caught_up(d):
                self._reset("connection reset by peer")
                return
            entry = self._maps.conn(d.src_cookie)
            if entry is not None and entry.passed:  # handed up just before the FIN
                await self._move(d, int(entry.passed))
            d.dst.shutdown(socket.SHUT_WR)
        except OSError as e:
            self._reset(error_text(e))
            return
        d.finished = True
        if self._forward.finished and self._back.finished:
            self._finish(None, rst=False)

    # ------------------------------------------------------------------ endings

    def abort(self, reason: str) -> None:
        """Reset both connections (policy change, shutdown deadline)."""
        self._finish(reason, rst=True)

    def _reset(self, reason: str) -> None:
        self._finish(reason, rst=True)

    def _finish(self, error: str | None, *, rst: bool) -> None:
        if self.done.done():
            return
        current = asyncio.current_task()
        for d in (self._forward, self._back):
            self._splicer._untrack(d)
            if d.rearm is not None:
                d.rearm.cancel()
            if d.task is not None and d.task is not current:
                d.task.cancel()
            d.final_sent = self._maps.sent(d.src_cookie)
            with contextlib.suppress(BpfError, LibbpfError):
                self._maps.forget(d.src_cookie)
        for sock in (self._a, self._b):
            if rst:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
            sock.close()
        self._splicer._ended(self)
        self.done.set_result(SpliceResult(self.bytes_in, self.bytes_out, error))


@dataclass(eq=False, slots=True)
class SpliceOffer:
    """An outbound stream to a pod of this node, waiting to be claimed by its inbound side."""

    key: StreamKey
    down: TcpSide
    spliced: KernelSplice | None = None


@dataclass(eq=False)
class KernelSplicer:
    """The daemon's kernel splice: offers, claims, live connections, and why it is off."""

    maps: SpliceMaps | None
    status: str  # "on", or why it is off (shown at start and in /debug)
    window: int = DEFAULT_WINDOW_BYTES
    _offers: dict[StreamKey, SpliceOffer] = field(default_factory=dict)
    _live: set[KernelSplice] = field(default_factory=set)
    spliced_total: int = 0
    failed_total: int = 0
    takeovers: int = 0
    quiet_wakeups: int = 0  # an event with nothing to read, each followed by a pause
    copied_bytes: int = 0
    kernel_bytes_closed: int = 0
    # Spliced sockets by fd (watched for FIN and errors) and by cookie (announced hand-ups).
    _by_fd: dict[int, tuple[KernelSplice, _Direction]] = field(default_factory=dict)
    _by_cookie: dict[int, tuple[KernelSplice, _Direction]] = field(default_factory=dict)
    _epoll: select.epoll | None = None
    _loop: asyncio.AbstractEventLoop | None = None
    _events_lost: int = 0  # the program's count when last looked at

    @property
    def enabled(self) -> bool:
        return self.maps is not None

    def offer(self, hbone: HboneProtocol, stream_id: int, down: TcpSide) -> SpliceOffer | None:
        if self.maps is None or hbone.transport is None:
            return None
        try:
            key = _stream_key(
                hbone.transport.get_extra_info("sockname"),
                hbone.transport.get_extra_info("peername"),
                stream_id,
            )
        except (TypeError, ValueError):
            return None
        offer = SpliceOffer(key, down)
        self._offers[key] = offer
        log.debug("kernel splice offer for stream %s", key)
        return offer

    def withdraw(self, offer: SpliceOffer) -> None:
        if self._offers.get(offer.key) is offer:
            del self._offers[offer.key]

    def claim(
        self, peer: SocketAddr, local: SocketAddr, stream_id: int, up: TcpSide
    ) -> KernelSplice | None:
        """The inbound side of an offered stream: splice both sockets, or ``None``."""
        maps = self.maps
        offer = self._offers.pop((peer, local, stream_id), None)
        if maps is None or offer is None:
            return None
        if not (offer.down.untouched and up.untouched):
            log.debug(
                "kernel splice skipped stream %s: a side was already read (%s, %s)",
                offer.key,
                offer.down.untouched,
                up.untouched,
            )
            return None
        a_sock = _socket_of(offer.down)
        b_sock = _socket_of(up)
        early = (offer.down.take_early(), up.take_early())
        written = [0, 0]  # of early[0] (to b) and early[1] (to a), by ``write_early``

        def write_early() -> None:
            # Read before the pause took effect: older than anything the kernel will send on.
            for i, (data, to) in enumerate(((early[0], b_sock), (early[1], a_sock))):
                # The transports' sockets are non-blocking and offer no send(): write the fd.
                if data:
                    written[i] = os.write(to.fileno(), data)
                    if written[i] != len(data):
                        raise BlockingIOError(
                            f"{len(data) - written[i]} early bytes did not fit the send buffer"
                        )

        try:
            for sock in (a_sock, b_sock):
                hold_window(sock, self.window)
            pairing = maps.pair(a_sock, b_sock, window=self.window, first=write_early)
        except (MapFull, BpfError, LibbpfError, OSError) as e:
            self.failed_total += 1
            if isinstance(e, LibbpfError) and e.errno == errno.EOPNOTSUPP:
                # A sockhash takes established sockets only: a side sent its FIN, perhaps
                # while it was being paired.
                log.debug("kernel splice skipped a connection already closing: %s", e)
            else:
                log.warning("kernel splice refused a connection, copying it instead: %s", e)
            # The Python splice takes over: what was written is counted, the rest replayed.
            offer.down.credit(read=written[0], written=written[1])
            up.credit(read=written[1], written=written[0])
            offer.down.put_back_early(early[0][written[0] :])
            up.put_back_early(early[1][written[1] :])
            return None
        a = offer.down.release()
        b = up.release()
        splice = KernelSplice(self, maps, a, b, pairing, self.window, early=early)
        offer.spliced = splice
        self._live.add(splice)
        self.spliced_total += 1
        return splice

    # ------------------------------------------------------------------ watching

    def _track(self, splice: KernelSplice, d: _Direction) -> None:
        if self._epoll is None:
            self._epoll = select.epoll()
            self._loop = asyncio.get_running_loop()
            self._loop.add_reader(self._epoll.fileno(), self._socket_events)
            if self.maps is not None:
                self._loop.add_reader(self.maps.hand_ups.fd, self._hand_ups)
        self._by_cookie[d.src_cookie] = (splice, d)
        self._by_fd[d.src.fileno()] = (splice, d)
        self._watch(d)

    def _untrack(self, d: _Direction) -> None:
        self._unwatch(d)
        self._by_cookie.pop(d.src_cookie, None)
        self._by_fd.pop(d.src.fileno(), None)

    def _watch(self, d: _Direction) -> None:
        if self._epoll is not None:
            with contextlib.suppress(FileExistsError):
                self._epoll.register(d.src.fileno(), _FIN_OR_ERROR)

    def _unwatch(self, d: _Direction) -> None:
        if self._epoll is not None:
            with contextlib.suppress(FileNotFoundError, ValueError, OSError):
                self._epoll.unregister(d.src.fileno())

    def _socket_events(self) -> None:
        assert self._epoll is not None
        for fd, _mask in self._epoll.poll(0):
            tracked = self._by_fd.get(fd)
            if tracked is not None:
                splice, d = tracked
                splice._readable(d)

    def _hand_ups(self) -> None:
        if self.maps is None:
            return
        try:
            cookies = self.maps.handed_up_sockets()
            lost = self.maps.event_counts()["events_lost"]
        except (BpfError, LibbpfError) as e:
            log.warning("kernel splice could not read its hand-up events: %s", e)
            return
        if lost != self._events_lost:  # announcements dropped: look at every socket
            self._events_lost = lost
            cookies = list(self._by_cookie)
        for cookie in cookies:
            tracked = self._by_cookie.get(cookie)
            if tracked is None:
                continue
            splice, d = tracked
            entry = self.maps.conn(cookie)
            if entry is not None and entry.passed:
                splice._handed_up(d)

    def _ended(self, splice: KernelSplice) -> None:
        self._live.discard(splice)
        self.kernel_bytes_closed += splice.bytes_in + splice.bytes_out - splice.copied

    def debug(self) -> dict[str, Any]:
        live_kernel = sum(s.bytes_in + s.bytes_out - s.copied for s in self._live)
        out: dict[str, Any] = {
            "status": self.status,
            "window_bytes": self.window,
            "connections_spliced": self.spliced_total,
            "connections_live": len(self._live),
            "connections_refused": self.failed_total,
            "offers_pending": len(self._offers),
            "kernel_bytes": self.kernel_bytes_closed + live_kernel,
            "proxy_copied_bytes": self.copied_bytes,
            "takeovers": self.takeovers,
            "quiet_wakeups": self.quiet_wakeups,
        }
        if self.maps is not None:
            with contextlib.suppress(BpfError, LibbpfError):
                out["program_events"] = self.maps.event_counts()
        return out

    def close(self) -> None:
        for splice in list(self._live):
            splice.abort("connection closed: proxy is shutting down")
        if self._epoll is not None:
            if self._loop is not None and not self._loop.is_closed():
                self._loop.remove_reader(self._epoll.fileno())
                if self.maps is not None:
                    self._loop.remove_reader(self.maps.hand_ups.fd)
            self._epoll.close()
            self._epoll = None
        if self.maps is not None:
            self.maps.close()
            self.maps = None


def hold_window(sock: socket.socket, window: int) -> None:
    """Let ``sock``'s send buffer hold a whole window of bytes sent on to it.

    The kernel moves redirected skbs into the destination socket from a worker that, when the
    send buffer is full, tries again only a jiffy later (4 ms at HZ=250), however soon room
    frees up; the window already bounds what is queued, so a buffer that fits it removes
    those pauses (measured: same-node bulk 2-5 -> 6-12 Gbit/s). Raising a buffer past
    ``net.core.wmem_max`` takes CAP_NET_ADMIN, which the daemon has; without it the sysctl's
    bound applies."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, window)
    except PermissionError:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, window)


def _socket_of(side: TcpSide) -> Any:
    assert side.transport is not None
    return side.transport.get_extra_info("socket")


def _stream_key(sockname: Any, peername: Any, stream_id: int) -> StreamKey:
    return sockaddr(sockname), sockaddr(peername), stream_id
