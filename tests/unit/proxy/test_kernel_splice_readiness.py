"""A spliced socket that polls readable with nothing to read does not make the proxy spin.

Under bulk load the kernel reports a spliced source readable while the verdict program is
still sending its bytes on; a ``recv(MSG_PEEK)`` then finds nothing. Readiness is
level-triggered, so the event loop called ``_readable`` again on every iteration (0.6-0.75 vCPU
of the daemon, half the bulk throughput). These tests stand in for that kernel state with a
socket whose peek says "nothing yet" while its fd is readable; the maps are a stand-in too
(no BPF here), the TCP sockets are real loopback ones.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator

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
async def test_readiness_with_nothing_to_read_is_not_polled_in_a_loop(
    sockets: list[socket.socket], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(kernel_splice, "_QUIET_FIRST_S", 3600.0)  # no second look in this test
    client, accepted = tcp_pair()
    server, connected = tcp_pair()
    source = QuietSocket(accepted, quiet=1_000_000)
    sockets += [client, server, source, connected]
    client.sendall(b"x")  # the fd stays readable throughout
    splice, splicer = splice_of(source, connected)
    for _ in range(50):  # 50 turns of the loop, each one polls the fds
        await asyncio.sleep(0)
    assert source.peeks == 1
    assert splicer.quiet_wakeups == 1
    assert splicer.debug()["quiet_wakeups"] == 1
    splice.abort("test over")
    assert splice.done.done()


@pytest.mark.asyncio
async def test_after_the_pause_the_source_is_watched_again_and_its_eof_goes_on(
    sockets: list[socket.socket],
) -> None:
    client, accepted = tcp_pair()
    server, connected = tcp_pair()
    source = QuietSocket(accepted, quiet=1)
    sockets += [client, server, source, connected]
    splice, splicer = splice_of(source, connected)
    client.shutdown(socket.SHUT_WR)  # readable with an EOF; the first peek finds nothing
    server.settimeout(30)
    assert await asyncio.to_thread(server.recv, 1) == b""  # the EOF reached the destination
    assert source.peeks == 2
    assert splicer.quiet_wakeups == 1
    splice.abort("test over")
