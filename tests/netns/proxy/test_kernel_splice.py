"""The kernel splice of same-node connections, on the real kernel, through the real proxy.

The proxy harness runs a client pod's outbound server and a server pod's inbound server in
this process with real mTLS, both on this node: every connection goes through HBONE (mTLS and
authorization), then the two plain sockets are spliced by ``splice.o``. Each test checks what
an application sees (bytes, EOF, resets) and what telemetry reports (both sides' byte counts,
from the kernel's counters), and that Python copied nothing (``proxy_copied_bytes``) unless
the destination was slow.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import io
import json
import logging
import os
import socket
import struct
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from prometheus_client import CollectorRegistry

from ztunnel_py.bpf.splice import SpliceMaps, tcp_progress
from ztunnel_py.dataplane import start_kernel_splice
from ztunnel_py.errors import UnsupportedFeature
from ztunnel_py.proxy.conntrack import POLICY_CHANGE_ERROR, ConnectionTracker
from ztunnel_py.proxy.kernel_splice import KernelSplice, KernelSplicer
from ztunnel_py.state.store import ProxyState, UpdateBatch
from ztunnel_py.telemetry import logging as ztlogging
from ztunnel_py.telemetry.metrics import ConnectionMetrics
from ztunnel_py.telemetry.sink import ProxyTelemetry
from ztunnel_py.testing.proxy_harness import Mesh, echo_app, make_config, pattern, start_mesh

pytestmark = [pytest.mark.bpf, pytest.mark.root]

_LINGER_RST = struct.pack("ii", 1, 0)


@pytest.fixture
def access_log() -> Iterator[io.StringIO]:
    root = logging.getLogger()
    saved_handlers, saved_level = list(root.handlers), root.level
    buffer = io.StringIO()
    ztlogging.configure("info", json_format=True, stream=buffer)
    yield buffer
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in saved_handlers:
        root.addHandler(handler)
    root.setLevel(saved_level)


def access_lines(buffer: io.StringIO, direction: str) -> list[dict[str, Any]]:
    lines = [json.loads(line) for line in buffer.getvalue().splitlines()]
    return [r for r in lines if r["scope"] == "access" and r.get("direction") == direction]


async def until(condition: Callable[[], bool], what: str) -> None:
    for _ in range(1000):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"never happened: {what}")


class Spliced:
    """A mesh whose pods share a node, with a kernel splicer and telemetry."""

    def __init__(
        self,
        mesh: Mesh,
        splicer: KernelSplicer,
        registry: CollectorRegistry,
        telemetry: ProxyTelemetry,
    ) -> None:
        self.mesh = mesh
        self.splicer = splicer
        self.registry = registry
        self.telemetry = telemetry

    def live(self) -> KernelSplice:
        (splice,) = self.splicer._live
        return splice

    def bytes(self, direction: str) -> tuple[float, float]:
        """(sent, received) of the one connection reported by ``direction``'s side, brought
        up to date as before a scrape. As in Istio, "sent" is the response direction (server
        to client), "received" the request direction."""
        self.telemetry.flush()

        def value(name: str) -> float:
            return sum(
                s.value
                for family in self.registry.collect()
                for s in family.samples
                if s.name == name and s.labels.get("reporter") == direction
            )

        return value("istio_tcp_sent_bytes_total"), value("istio_tcp_received_bytes_total")


@contextlib.asynccontextmanager
async def spliced_mesh(
    *, window: int | None = None, conntrack: ConnectionTracker | None = None
) -> AsyncIterator[Spliced]:
    maps = SpliceMaps.load(_objects())
    splicer = KernelSplicer(maps, "on")
    if window is not None:
        splicer.window = window
    registry = CollectorRegistry()
    state = ProxyState()
    telemetry = ProxyTelemetry(ConnectionMetrics(registry), state)
    mesh = await start_mesh(
        telemetry=telemetry, state=state, conntrack=conntrack, kernel_splice=splicer
    )
    try:
        yield Spliced(mesh, splicer, registry, telemetry)
    finally:
        await mesh.stop()
        splicer.close()


def _objects() -> Path:
    root = Path(__file__).resolve().parents[3]
    proc = subprocess.run(
        ["make", "-s", "-C", str(root / "bpf")], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, proc.stderr
    return root / "bpf" / "out"


@pytest_asyncio.fixture
async def spliced() -> AsyncIterator[Spliced]:
    async with spliced_mesh() as s:
        yield s


@pytest.mark.asyncio
async def test_bytes_both_ways_are_counted_by_the_kernel_and_never_copied(
    spliced: Spliced, access_log: io.StringIO
) -> None:
    mesh = spliced.mesh
    port = await mesh.serve_app(echo_app)
    reader, writer = await mesh.dial(port)
    # Spliced as soon as the tunnel is up, before any byte: nothing is ever read by Python.
    await until(lambda: spliced.splicer.spliced_total == 1, "the connection is spliced")
    up = pattern(3 * 1024 * 1024, 1)
    writer.write(up)
    echoed = await reader.readexactly(len(up))
    assert echoed == up
    splice = spliced.live()
    # While it lives: the kernel counted every byte, Python copied none, scrapes see them.
    assert (splice.bytes_in, splice.bytes_out) == (len(up), len(up))
    assert splice.copied == 0 and spliced.splicer.copied_bytes == 0
    assert spliced.splicer.maps is not None
    assert spliced.splicer.maps.event_counts()["redirected"] > 0
    assert spliced.bytes("source") == (len(up), len(up))
    assert spliced.bytes("destination") == (len(up), len(up))
    # The HBONE stream was only needed for mTLS and authorization: its slot is free again.
    (hbone,) = mesh.pool.connections()
    assert hbone.open_streams == 0
    writer.write_eof()
    assert await reader.read() == b""  # echo_app closes after our EOF: FIN came back
    writer.close()
    await until(lambda: not spliced.splicer._live, "the splice ended")
    assert spliced.splicer.spliced_total == 1 and spliced.splicer.copied_bytes == 0
    for direction in ("outbound", "inbound"):
        (line,) = access_lines(access_log, direction)
        assert (line["bytes_sent"], line["bytes_recv"]) == (len(up), len(up)), line
        assert "error" not in line, line


@pytest.mark.asyncio
async def test_requests_on_a_spliced_connection_do_not_wake_the_proxy(
    spliced: Spliced, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The proxy watches spliced sockets for FIN and errors only (on testbed veths the kernel
    reports a socket readable while it sends the socket's bytes on, which woke the proxy for
    every message; the unit tests reproduce that state): messages cost it nothing, and the FIN
    still reaches it through that watch."""
    looks: list[int] = []
    readable = KernelSplice._readable

    def counted(self: KernelSplice, d: Any) -> None:
        looks.append(d.src_cookie)
        readable(self, d)

    monkeypatch.setattr(KernelSplice, "_readable", counted)
    mesh = spliced.mesh
    port = await mesh.serve_app(echo_app)
    reader, writer = await mesh.dial(port)
    await until(lambda: spliced.splicer.spliced_total == 1, "the connection is spliced")
    for i in range(200):
        message = pattern(512, i)
        writer.write(message)
        assert await reader.readexactly(len(message)) == message
    assert looks == []
    assert spliced.splicer.quiet_wakeups == 0
    writer.write_eof()
    assert await reader.read() == b""
    writer.close()
    await until(lambda: not spliced.splicer._live, "the splice ended")
    assert looks  # the FINs were seen


@pytest.mark.asyncio
async def test_each_spliced_socket_can_queue_a_whole_window(spliced: Spliced) -> None:
    """The kernel's send-on worker waits a jiffy whenever the destination's send buffer is
    full; a buffer that holds the window (which bounds what is queued anyway) spares those
    pauses. The kernel reports twice what was set (its bookkeeping overhead)."""
    mesh = spliced.mesh
    port = await mesh.serve_app(echo_app)
    _reader, writer = await mesh.dial(port)
    await until(lambda: spliced.splicer.spliced_total == 1, "the connection is spliced")
    splice = spliced.live()
    for sock in (splice._a, splice._b):
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) >= 2 * spliced.splicer.window
    writer.close()
    await until(lambda: not spliced.splicer._live, "the splice ended")


async def _half_close_app(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Read until EOF, then answer how much came and keep sending after the client's FIN."""
    data = await reader.read()
    writer.write(f"got {len(data)}".encode())
    await writer.drain()
    writer.write(b" and more")
    writer.close()


@pytest.mark.asyncio
async def test_half_close_from_the_client_keeps_the_other_direction(spliced: Spliced) -> None:
    mesh = spliced.mesh
    port = await mesh.serve_app(_half_close_app)
    reader, writer = await mesh.dial(port)
    writer.write(b"x" * 5000)
    await until(lambda: bool(spliced.splicer._live), "the connection is spliced")
    writer.write_eof()
    assert await reader.read() == b"got 5000 and more"
    writer.close()
    await until(lambda: not spliced.splicer._live, "the splice ended")
    assert spliced.splicer.spliced_total == 1
    assert spliced.bytes("source") == (len(b"got 5000 and more"), 5000)


async def _server_half_closes(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """After the client's first byte: send a greeting, shut the write side, read to EOF."""
    await reader.readexactly(1)
    writer.write(b"hello")
    await writer.drain()
    writer.write_eof()
    data = await reader.read()
    # Our write side is shut: report by closing; the count is checked through telemetry.
    assert data == b"y" * 6999
    writer.close()


@pytest.mark.asyncio
async def test_half_close_from_the_server_keeps_the_other_direction(spliced: Spliced) -> None:
    mesh = spliced.mesh
    port = await mesh.serve_app(_server_half_closes)
    reader, writer = await mesh.dial(port)
    writer.write(b"y")
    assert await reader.read() == b"hello"  # the server's FIN arrived, our side still open
    assert spliced.splicer.spliced_total == 1
    writer.write(b"y" * 6999)
    await writer.drain()
    writer.write_eof()
    writer.close()
    await until(lambda: not spliced.splicer._live, "the splice ended")
    assert spliced.bytes("source") == (5, 7000)
    assert spliced.bytes("destination") == (5, 7000)


async def _reset_after(
    n: int, resets: list[asyncio.StreamWriter]
) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter], Any]:
    async def app(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(n)
        writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
        writer.transport.abort()
        resets.append(writer)

    return app


@pytest.mark.asyncio
async def test_reset_by_the_server_reaches_the_client(spliced: Spliced) -> None:
    mesh = spliced.mesh
    resets: list[asyncio.StreamWriter] = []
    port = await mesh.serve_app(await _reset_after(10, resets))
    reader, writer = await mesh.dial(port)
    writer.write(b"0123456789")
    with pytest.raises(ConnectionResetError):
        await reader.read()
    writer.close()
    await until(lambda: not spliced.splicer._live, "the splice ended")
    assert resets


@pytest.mark.asyncio
async def test_reset_by_the_client_reaches_the_server(spliced: Spliced) -> None:
    mesh = spliced.mesh
    seen: asyncio.Future[BaseException | bytes] = asyncio.get_running_loop().create_future()

    async def app(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            seen.set_result(await reader.read())
        except OSError as e:
            seen.set_result(e)

    port = await mesh.serve_app(app)
    _reader, writer = await mesh.dial(port)
    writer.write(b"abc")
    await until(lambda: spliced.splicer.spliced_total == 1, "the connection is spliced")
    await until(lambda: spliced.live().bytes_in == 3, "the kernel carried the first bytes")
    writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
    writer.transport.abort()
    result = await asyncio.wait_for(seen, 10)
    assert isinstance(result, ConnectionResetError), result
    await until(lambda: not spliced.splicer._live, "the splice ended")


@pytest.mark.asyncio
async def test_policy_change_cuts_a_spliced_connection(access_log: io.StringIO) -> None:
    conntrack = ConnectionTracker()
    async with spliced_mesh(conntrack=conntrack) as spliced:
        mesh = spliced.mesh
        port = await mesh.serve_app(echo_app)
        reader, writer = await mesh.dial(port)
        writer.write(b"before")
        assert await reader.readexactly(6) == b"before"
        assert spliced.splicer.spliced_total == 1
        (handle,) = list(conntrack)
        handle.close(POLICY_CHANGE_ERROR)  # what on_policy_change does for a denied connection
        with pytest.raises(ConnectionResetError):
            await reader.read()
        writer.close()
        await until(lambda: not spliced.splicer._live, "the splice ended")
        (inb,) = access_lines(access_log, "inbound")
        assert inb["error"] == POLICY_CHANGE_ERROR
        assert (inb["bytes_sent"], inb["bytes_recv"]) == (6, 6)
        (out,) = access_lines(access_log, "outbound")
        assert (out["bytes_sent"], out["bytes_recv"]) == (6, 6)


@pytest.mark.asyncio
async def test_a_slow_destination_gets_backpressure_and_every_byte_in_order() -> None:
    """A window of 1 MiB: the reader sleeps first, so the kernel hands data back to the
    proxy (a takeover), which resumes the kernel once the reader caught up."""
    async with spliced_mesh(window=1024 * 1024) as spliced:
        mesh = spliced.mesh
        total = 16 * 1024 * 1024
        received: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        start_reading = asyncio.Event()

        async def slow_app(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await start_reading.wait()
            received.set_result(await reader.readexactly(total))
            writer.close()

        port = await mesh.serve_app(slow_app)
        _reader, writer = await mesh.dial(port)
        data = pattern(total, 5)
        writer.write(data)
        await until(lambda: spliced.splicer.spliced_total == 1, "the connection is spliced")
        # The sender is held back: the kernel does not queue without bound.
        await until(lambda: writer.transport.get_write_buffer_size() > 0, "the sender is held")
        start_reading.set()
        assert await asyncio.wait_for(received, 120) == data
        writer.close()
        await until(lambda: not spliced.splicer._live, "the splice ended")
        assert spliced.splicer.takeovers >= 1
        assert spliced.bytes("source")[1] == total


@pytest.mark.asyncio
async def test_unspliced_paths_are_unchanged_when_the_destination_is_on_another_node() -> None:
    async with spliced_mesh() as spliced:
        mesh = spliced.mesh
        # The server pod moves to another node: no offer, the Python splice carries it.
        other = dataclasses.replace(mesh.server, node="node-b")
        mesh.state.apply(UpdateBatch(workloads=(other,)))
        port = await mesh.serve_app(echo_app)
        reader, writer = await mesh.dial(port)
        writer.write(b"ping")
        assert await reader.readexactly(4) == b"ping"
        writer.close()
        assert spliced.splicer.spliced_total == 0 and not spliced.splicer._offers


@pytest.mark.asyncio
async def test_bytes_sent_before_the_splice_come_first_and_are_counted(spliced: Spliced) -> None:
    """The client writes at once: the event loop may read once before the pause takes effect;
    those bytes are written to the destination before the kernel sends anything on."""
    mesh = spliced.mesh
    port = await mesh.serve_app(echo_app)
    reader, writer = await mesh.dial(port)
    up = pattern(2 * 1024 * 1024, 3)
    writer.write(up)
    assert await reader.readexactly(len(up)) == up
    splice = spliced.live()
    assert (splice.bytes_in, splice.bytes_out) == (len(up), len(up))
    assert splice.copied <= 256 * 1024  # one read of the event loop at most
    assert spliced.bytes("source") == (len(up), len(up))
    writer.close()


def test_a_kernel_without_the_pieces_falls_back_to_the_copy_and_says_why(tmp_path: Path) -> None:
    """No splice.o (as with a kernel or build that lacks it): off with the reason, or a
    start-up error when it was asked for."""
    config = make_config(bpf_object_dir=tmp_path)
    splicer = start_kernel_splice(config)
    assert not splicer.enabled
    assert splicer.status.startswith("off: BPF object") and "make -C bpf" in splicer.status
    assert splicer.debug()["status"] == splicer.status
    with pytest.raises(UnsupportedFeature, match="unset ZTUNNEL_PY_KERNEL_SPLICE"):
        start_kernel_splice(make_config(bpf_object_dir=tmp_path, kernel_splice=True))
    off = start_kernel_splice(make_config(kernel_splice=False))
    assert off.status == "off: ZTUNNEL_PY_KERNEL_SPLICE=false" and not off.enabled


def test_on_this_kernel_it_starts_after_its_self_test() -> None:
    splicer = start_kernel_splice(make_config(bpf_object_dir=_objects()))
    try:
        assert splicer.enabled and splicer.status == "on"
        assert splicer.debug()["program_events"]["redirected"] >= 2  # the self-test's bytes
    finally:
        splicer.close()


_HEAP_AFTER_SPLICE_START = """
import sys
from pathlib import Path
from ztunnel_py.dataplane import start_kernel_splice
from ztunnel_py.proxy.memory import tune_malloc
from ztunnel_py.testing.proxy_harness import make_config

def rss_anon_kib():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1])

tune_malloc()  # as the daemon and each worker do before anything else
config = make_config(bpf_object_dir=Path(sys.argv[1]))
before = rss_anon_kib()
splicer = start_kernel_splice(config)
print(splicer.status, rss_anon_kib() - before)
"""


def test_starting_it_leaves_no_resident_heap_behind() -> None:
    """libbpf parses the kernel's BTF to load the sk_skb program (~11 MiB, freed at once);
    with tune_malloc's thresholds glibc would keep it resident for the daemon's lifetime."""
    out = subprocess.run(
        [sys.executable, "-c", _HEAP_AFTER_SPLICE_START, str(_objects())],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    status, grown_kib = out[0], int(out[-1])
    assert status == "on"
    assert grown_kib < 3 * 1024, f"anonymous RSS grew {grown_kib} KiB starting the splice"


@pytest.mark.asyncio
async def test_a_client_that_closes_at_once_is_served_by_the_copy(spliced: Spliced) -> None:
    """Data and FIN sent before the tunnel is up: the sockhash refuses a socket past
    ESTABLISHED, so the proxy copies this one, early bytes included (nothing is reset)."""
    mesh = spliced.mesh
    port = await mesh.serve_app(echo_app)
    reader, writer = await mesh.dial(port)
    writer.write(b"z" * 5000)
    writer.write_eof()
    assert await reader.read() == b"z" * 5000
    writer.close()


_TCP_CLOSE_WAIT = 8  # tcpi_state: the peer's FIN has arrived


@pytest.mark.asyncio
async def test_a_fin_racing_the_pairing_falls_back_to_the_copy_with_the_early_bytes(
    spliced: Spliced, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The client's FIN lands after the bytes read early were written but before the sockets
    join the verdict map, which then refuses the closing socket (EOPNOTSUPP): the copy takes
    over; the early bytes are neither lost, sent twice nor reset, and both sides count them."""
    mesh = spliced.mesh
    greeting = b"220 ready\r\n"
    request = b"q" * 5000
    client_fd: list[int] = []
    written_early: list[int] = []
    real_pair = SpliceMaps.pair

    def pair_with_a_fin_between(
        self: SpliceMaps, a: socket.socket, b: socket.socket, *, window: int, first: Any
    ) -> Any:
        def write_then_fin() -> None:
            before = tcp_progress(a).written + tcp_progress(b).written
            first()
            written_early.append(tcp_progress(a).written + tcp_progress(b).written - before)
            fin = socket.socket(fileno=os.dup(client_fd[0]))
            fin.shutdown(socket.SHUT_WR)
            fin.close()
            for _ in range(2000):  # the FIN crosses loopback in softirq, not in this loop
                if tcp_progress(a).state == _TCP_CLOSE_WAIT:
                    break
                time.sleep(0.001)
            assert tcp_progress(a).state == _TCP_CLOSE_WAIT

        return real_pair(self, a, b, window=window, first=write_then_fin)

    monkeypatch.setattr(SpliceMaps, "pair", pair_with_a_fin_between)

    async def greet_then_echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(greeting)  # server-first, as SMTP: read by the inbound side early
        await echo_app(reader, writer)

    port = await mesh.serve_app(greet_then_echo)
    reader, writer = await mesh.dial(port)
    client_fd.append(writer.get_extra_info("socket").fileno())
    writer.write(request)
    assert await asyncio.wait_for(reader.read(), 10) == greeting + request
    writer.close()
    assert written_early and written_early[0] > 0, "nothing was read early: the race not set up"
    assert spliced.splicer.failed_total == 1 and spliced.splicer.spliced_total == 0
    want = (len(greeting + request), len(request))  # (sent, received) as Istio counts them
    for _ in range(500):  # both sides report once their splices finish
        if all(spliced.bytes(r) == want for r in ("source", "destination")):
            break
        await asyncio.sleep(0.01)
    assert (spliced.bytes("source"), spliced.bytes("destination")) == (want, want)
