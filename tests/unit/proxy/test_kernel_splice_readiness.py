"""What wakes the proxy for a spliced connection: FIN, errors and announced hand-ups, not input.

The kernel reports a spliced socket readable while the verdict program is still sending its
bytes on, so watching for input woke the daemon for every message of every spliced connection
(and, under bulk load, in a loop: 0.6-0.75 vCPU, half the bulk throughput). The proxy now
watches spliced sockets for FIN and errors only, and learns of hand-ups from the program's
ring buffer. These tests use real loopback TCP sockets and stand-ins for the BPF maps; the
real kernel's side is in tests/netns/proxy/test_kernel_splice.py.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator
from types import SimpleNamespace

import pytest

from ztunnel_py.bpf.splice import Pairing, tcp_progress
from ztunnel_py.proxy import kernel_splice
from ztunnel_py.proxy.kernel_splice import KernelSplice, KernelSplicer


class QuietSocket(socket.socket):
    """A socket whose first ``quiet`` peeks find nothing, whatever its queue holds."""

    def __init__(self, sock: socket.socket, quiet: int) -> None:
        super().__init__(sock.family, sock.type, sock.proto, fileno=sock.detach())
        self.quiet = quiet
        self.peeks = 0

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        if flags & socket.MSG_PEEK:
            self.peeks += 1
            if self.quiet > 0:
                self.quiet -= 1
                raise BlockingIOError
        return super().recv(bufsize, flags)


class NoMaps:
    """What ``KernelSplice`` asks of the maps when nothing was sent on."""

    def sent(self, cookie: int) -> int:
        return 0

    def conn(self, cookie: int) -> None:
        return None

    def forget(self, cookie: int) -> None:
        pass


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        outer = socket.create_connection(listener.getsockname())
        inner, _ = listener.accept()
    return outer, inner


def four_sockets(
    sockets: list[socket.socket], quiet: int
) -> tuple[socket.socket, socket.socket, QuietSocket, socket.socket]:
    """(client, server, source, connected): the client application's socket and the source
    the proxy accepted from it (peeks quiet ``quiet`` times), the server application's socket
    and the proxy's connected one; all closed by the ``sockets`` fixture."""
    client, accepted = tcp_pair()
    server, connected = tcp_pair()
    source = QuietSocket(accepted, quiet=quiet)
    sockets += [client, server, source, connected]
    return client, server, source, connected


@pytest.fixture
def sockets() -> Iterator[list[socket.socket]]:
    opened: list[socket.socket] = []
    yield opened
    for s in opened:
        s.close()


def splice_of(a: socket.socket, b: socket.socket) -> tuple[KernelSplice, KernelSplicer]:
    splicer = KernelSplicer(None, "test")
    pairing = Pairing(1, 2, tcp_progress(a).written, tcp_progress(b).written)
    return KernelSplice(splicer, NoMaps(), a, b, pairing, 1 << 20), splicer  # type: ignore[arg-type]


@pytest.mark.asyncio
async def test_input_on_a_spliced_socket_does_not_wake_the_proxy(
    sockets: list[socket.socket],
) -> None:
    client, _server, source, connected = four_sockets(sockets, quiet=0)
    client.sendall(b"x")  # readable from here on: the kernel would say so for bytes in transit
    splice, _splicer = splice_of(source, connected)
    for _ in range(50):  # 50 turns of the loop, each one polls the fds
        await asyncio.sleep(0)
    assert source.peeks == 0
    splice.abort("test over")
    assert splice.done.done()


@pytest.mark.asyncio
async def test_an_event_with_nothing_to_read_is_not_polled_in_a_loop(
    sockets: list[socket.socket], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(kernel_splice, "_QUIET_FIRST_S", 3600.0)  # no second look in this test
    client, _server, source, connected = four_sockets(sockets, quiet=1_000_000)
    splice, splicer = splice_of(source, connected)
    client.shutdown(socket.SHUT_WR)  # a FIN: an event, whose peek this socket answers "nothing"
    for _ in range(50):
        await asyncio.sleep(0)
    assert source.peeks == 1
    assert splicer.quiet_wakeups == 1
    assert splicer.debug()["quiet_wakeups"] == 1
    splice.abort("test over")


@pytest.mark.asyncio
async def test_after_the_pause_the_source_is_watched_again_and_its_eof_goes_on(
    sockets: list[socket.socket],
) -> None:
    client, server, source, connected = four_sockets(sockets, quiet=1)
    splice, splicer = splice_of(source, connected)
    client.shutdown(socket.SHUT_WR)  # readable with an EOF; the first peek finds nothing
    server.settimeout(30)
    assert await asyncio.to_thread(server.recv, 1) == b""  # the EOF reached the destination
    assert source.peeks == 2
    assert splicer.quiet_wakeups == 1
    splice.abort("test over")


class AnnouncingMaps(NoMaps):
    """Maps whose ring buffer dropped announcements: none come, the lost count moved, and every
    socket has bytes handed up."""

    def __init__(self, fd: int) -> None:
        self.hand_ups = SimpleNamespace(fd=fd)

    def handed_up_sockets(self) -> list[int]:
        return []

    def event_counts(self) -> dict[str, int]:
        return {"redirected": 0, "handed_up": 2, "events_lost": 1}

    def conn(self, cookie: int) -> SimpleNamespace:  # type: ignore[override]
        return SimpleNamespace(passed=100)


@pytest.mark.asyncio
async def test_lost_announcements_make_the_proxy_look_at_every_spliced_socket(
    sockets: list[socket.socket], monkeypatch: pytest.MonkeyPatch
) -> None:
    taken: list[tuple[KernelSplice, int]] = []
    monkeypatch.setattr(
        KernelSplice, "_handed_up", lambda self, d: taken.append((self, d.src_cookie))
    )
    wake, wake_peer = socket.socketpair()  # stands in for the ring buffer's fd
    client, accepted = tcp_pair()
    server, connected = tcp_pair()
    sockets += [client, server, accepted, connected, wake, wake_peer]
    splicer = KernelSplicer(AnnouncingMaps(wake.fileno()), "test")  # type: ignore[arg-type]
    pairing = Pairing(1, 2, tcp_progress(accepted).written, tcp_progress(connected).written)
    splice = KernelSplice(splicer, splicer.maps, accepted, connected, pairing, 1 << 20)  # type: ignore[arg-type]
    splicer._hand_ups()
    assert sorted(cookie for _, cookie in taken) == [1, 2]
    taken.clear()
    splicer._hand_ups()  # the lost count did not move again: nothing to look at
    assert taken == []
    splice.abort("test over")
