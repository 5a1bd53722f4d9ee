"""The kernel splice's BPF side: ``splice.o`` loaded once per daemon, its maps never pinned.

``SpliceMaps.load`` loads the object, attaches its sk_skb stream verdict program to the
``zt_splice_rx`` sockhash and keeps fds of the four maps; the program and maps live as long as
the daemon (sockets close with it anyway). ``SpliceMaps.self_test`` splices one loopback
connection end to end, so a kernel that loads the program but does not carry bytes is found at
start, not on the first pod's traffic. The per-connection work (when to pair, stop, resume,
what FIN and RST mean) is ``proxy.kernel_splice``'s; this module only speaks to the maps and
reads the TCP state the window is computed from.
"""

from __future__ import annotations

import fcntl
import os
import select
import socket
import struct
import termios
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ztunnel_py.bpf import _types as t
from ztunnel_py.bpf import libbpf
from ztunnel_py.bpf.errors import BpfError, KeyNotFound
from ztunnel_py.bpf.libbpf import BpfObject, RingBuffer
from ztunnel_py.bpf.maps import LibbpfMap

SO_COOKIE = 57  # socket.SO_COOKIE is missing from older Pythons
_TCP_INFO_BYTES_ACKED = 120  # offsetof(struct tcp_info, tcpi_bytes_acked), Linux 4.1+
_TCP_INFO_SIZE = 128
TCP_CLOSE = 7  # tcpi_state


def socket_cookie(sock: socket.socket) -> int:
    raw = sock.getsockopt(socket.SOL_SOCKET, SO_COOKIE, 8)
    return int(struct.unpack("=Q", raw)[0])


@dataclass(frozen=True, slots=True)
class TcpProgress:
    """How much has been written into a socket, from its TCP state."""

    state: int  # tcpi_state
    acked: int  # tcpi_bytes_acked: acknowledged by the peer (the SYN counts 1 when we connected)
    queued: int  # SIOCOUTQ: written and not yet acknowledged

    @property
    def written(self) -> int:
        return self.acked + self.queued

    @property
    def closed(self) -> bool:
        return self.state == TCP_CLOSE


def tcp_progress(sock: socket.socket) -> TcpProgress:
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_SIZE)
    (acked,) = struct.unpack_from("=Q", info, _TCP_INFO_BYTES_ACKED)
    (queued,) = struct.unpack("=i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0" * 4))
    return TcpProgress(info[0], int(acked), int(queued))


def handed_up_bytes(sock: socket.socket) -> int:
    """Bytes the program passed up that wait in ``sock``'s psock queue (FIONREAD on a socket
    in a sockmap counts those, not its TCP receive queue)."""
    (n,) = struct.unpack("=i", fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0" * 4))
    return int(n)


def kick(sock: socket.socket) -> None:
    """Make the kernel run the verdict program on what already waits in ``sock``'s receive
    queue: setting SO_RCVLOWAT calls the socket's data-ready hook, which a freshly inserted
    socket otherwise only gets with its next packet."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)


@dataclass(frozen=True, slots=True)
class Pairing:
    """Two spliced sockets: their cookies and what each had written before (``TcpProgress``)."""

    cookie_a: int
    cookie_b: int
    base_a: int
    base_b: int


def _key(cookie: int) -> bytes:
    return bytes(t.ZtSpliceKey(cookie=cookie))


class SpliceMaps:
    """The four maps of ``splice.o`` (program attached), behind fds this object owns."""

    def __init__(self, maps: dict[str, LibbpfMap]) -> None:
        self.tx = maps[t.MAP_SPLICE_TX]
        self.rx = maps[t.MAP_SPLICE_RX]
        self.conns = maps[t.MAP_SPLICE_CONNS]
        self.events = maps[t.MAP_SPLICE_STATS]
        self.hand_ups = RingBuffer(maps[t.MAP_SPLICE_EVENT].fd)  # fd: readable on a hand-up
        self._all = maps

    @classmethod
    def load(cls, object_dir: Path) -> SpliceMaps:
        """Load and attach; ``BpfError`` (or ``LibbpfError``) says what is missing."""
        spec = t.PROG_SPECS[t.PROG_SPLICE_VERDICT]
        path = object_dir / spec.object_file
        if not path.is_file():
            raise BpfError(f"BPF object {path} is missing: build it with `make -C bpf`")
        obj = BpfObject(path)  # no pin root: nothing of the splice is pinned
        maps: dict[str, LibbpfMap] = {}
        try:
            obj.load()
            for handle in obj.maps():
                if handle.name in t.MAP_SPECS:
                    maps[handle.name] = LibbpfMap(handle.name, os.dup(handle.fd))
            obj.program(t.PROG_SPLICE_VERDICT).attach_to_map(
                maps[t.MAP_SPLICE_RX].fd, libbpf.BPF_SK_SKB_STREAM_VERDICT
            )
        except BaseException:
            for m in maps.values():
                m.close()
            raise
        finally:
            obj.close()  # the rx map holds the program; our fds hold the maps
        return cls(maps)

    def close(self) -> None:
        self.hand_ups.free()
        for m in self._all.values():
            m.close()

    def handed_up_sockets(self) -> list[int]:
        """Cookies of the sockets that started handing data up since the last call."""
        return [
            int(t.ZtSpliceKey.from_buffer_copy(r).cookie)
            for r in self.hand_ups.consume()
            if len(r) == t.SIZEOF_ZT_SPLICE_KEY
        ]

    # ------------------------------------------------------------------ per connection

    def pair(
        self,
        a: socket.socket,
        b: socket.socket,
        *,
        window: int,
        first: Callable[[], None] | None = None,
    ) -> Pairing:
        """Splice ``a`` and ``b``. ``first`` runs once both are redirect targets and before the
        program runs on either: the caller writes there what it read from them before.

        Order: both become redirect targets, both get their entry, then both start running
        the program, then both are kicked for what arrived before."""
        ca, cb = socket_cookie(a), socket_cookie(b)
        try:
            self.tx.update_socket(_key(ca), a.fileno())
            self.tx.update_socket(_key(cb), b.fileno())
            if first is not None:
                first()
            # What each counts as written so far: its SYN, if any, and what ``first`` wrote.
            base_a, base_b = tcp_progress(a).written, tcp_progress(b).written
            self.set_conn(ca, peer=cb, sent=0, peer_base=base_b, window=window)
            self.set_conn(cb, peer=ca, sent=0, peer_base=base_a, window=window)
            self.rx.update_socket(_key(ca), a.fileno())
            self.rx.update_socket(_key(cb), b.fileno())
        except BaseException:
            self.forget(ca)
            self.forget(cb)
            raise
        kick(a)
        kick(b)
        return Pairing(ca, cb, base_a, base_b)

    def set_conn(
        self, cookie: int, *, peer: int, sent: int, peer_base: int, window: int, passed: int = 0
    ) -> None:
        """Write a socket's entry; only while the program does not run on that socket."""
        value = t.ZtSpliceConn(
            peer_cookie=peer, bytes=sent, passed=passed, peer_base=peer_base, window=window
        )
        self.conns.update(_key(cookie), bytes(value))

    def conn(self, cookie: int) -> t.ZtSpliceConn | None:
        try:
            raw = self.conns.lookup(_key(cookie))
        except KeyNotFound:
            return None
        return t.ZtSpliceConn.from_buffer_copy(raw)

    def sent(self, cookie: int) -> int:
        """Bytes received on the socket and sent on by the kernel (0 once forgotten)."""
        entry = self.conn(cookie)
        return int(entry.bytes) if entry is not None else 0

    def stop(self, sock: socket.socket, cookie: int) -> None:
        """The program stops running on this socket: what arrives waits in its queue.

        A verdict already running on another CPU may still send one skb on; the kick takes
        the socket's lock, which that softirq holds, so once it returns the skb is counted."""
        self.rx.delete(_key(cookie))
        kick(sock)

    def resume(self, sock: socket.socket, cookie: int) -> None:
        self.rx.update_socket(_key(cookie), sock.fileno())
        kick(sock)

    def forget(self, cookie: int) -> None:
        for m in (self.rx, self.tx, self.conns):
            m.delete(_key(cookie))

    def event_counts(self) -> dict[str, int]:
        names = {
            t.ZT_SPLICE_CNT_REDIRECTED: "redirected",
            t.ZT_SPLICE_CNT_HANDED_UP: "handed_up",
            t.ZT_SPLICE_CNT_EVENTS_LOST: "events_lost",
        }
        out: dict[str, int] = {}
        for index, name in names.items():
            slots = self.events.lookup_per_cpu(struct.pack("=I", index))
            out[name] = sum(int.from_bytes(s, "little") for s in slots)
        return out

    # ------------------------------------------------------------------ start-up check

    def self_test(self, *, timeout_s: float = 2.0) -> None:
        """Splice two loopback connections and send a few bytes each way through the kernel;
        ``BpfError`` when they do not arrive or are not counted."""
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        opened: list[socket.socket] = [listener]
        try:
            listener.bind(("127.0.0.1", 0))
            listener.listen(4)
            client = socket.create_connection(listener.getsockname(), timeout=timeout_s)
            opened.append(client)
            a, _ = listener.accept()
            opened.append(a)
            b = socket.create_connection(listener.getsockname(), timeout=timeout_s)
            opened.append(b)
            server, _ = listener.accept()
            opened.append(server)
            client.sendall(b"early")  # before the pair: the kick must move it
            pairing = self.pair(a, b, window=1 << 20)
            ca, cb = pairing.cookie_a, pairing.cookie_b
            try:
                client.sendall(b"-ping")
                server.sendall(b"pong")
                got_server = _read_exactly(server, 10, timeout_s)
                got_client = _read_exactly(client, 4, timeout_s)
                sent = (self.sent(ca), self.sent(cb))
                # A window of 0 hands everything up: the socket must be announced.
                self.handed_up_sockets()
                self.stop(a, ca)
                self.set_conn(ca, peer=cb, sent=sent[0], peer_base=pairing.base_b, window=0)
                self.resume(a, ca)
                client.sendall(b"up")
                select.select([self.hand_ups.fd], [], [], timeout_s)
                announced = self.handed_up_sockets()
            finally:
                self.forget(ca)
                self.forget(cb)
            # The takeover reads exactly what FIONREAD says the psock queue holds: a kernel
            # whose FIONREAD counts the TCP receive queue instead would let it read newer bytes.
            self.tx.update_socket(_key(ca), a.fileno())
            try:
                client.sendall(b"queued")
                select.select([a], [], [], timeout_s)
                fionread = handed_up_bytes(a)
            finally:
                self.forget(ca)
        except OSError as e:
            raise BpfError(f"kernel splice self-test failed: {e}") from e
        finally:
            for s in opened:
                s.close()
        if fionread != 0:
            raise BpfError(
                "kernel splice self-test failed: FIONREAD on a sockmap socket counts its TCP "
                f"receive queue ({fionread} bytes), so backpressure could reorder bytes"
            )
        if announced != [ca]:
            raise BpfError(
                "kernel splice self-test failed: a socket handing data up was not announced "
                f"in zt_splice_event (got cookies {announced}, expected [{ca}])"
            )
        if got_server != b"early-ping" or got_client != b"pong" or sent != (10, 4):
            raise BpfError(
                "kernel splice self-test failed: the kernel carried "
                f"{got_server!r}/{got_client!r} (counted {sent}), expected b'early-ping'/b'pong'"
            )


def _read_exactly(sock: socket.socket, n: int, timeout_s: float) -> bytes:
    data = b""
    while len(data) < n:
        ready, _, _ = select.select([sock], [], [], timeout_s)
        if not ready:
            break
        chunk = sock.recv(n - len(data))
        if not chunk:
            break
        data += chunk
    return data
