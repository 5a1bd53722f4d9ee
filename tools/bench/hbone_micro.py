"""Python CPU per request of the HBONE path, without sockets: the adapter and core in memory.

A client and a server ``HboneProtocol`` (the real adapter, ``proxy/transport.py``, with the
real sans-I/O core under it) are wired back to back through in-memory transports, each with an
``HboneSplice`` on one established stream whose TCP side is an in-memory transport too. One
request is what the paced benchmark does per request, minus the kernel and TLS: the client
splice reads 1 KiB from its application, the server splice writes it to its application and
reads 1 KiB back, the client splice writes the answer out. ``time.process_time`` over many
requests gives the interpreter's microseconds per request (both daemons' share of it); what
``tools/bench/cpureq.py`` measures on the real daemons adds the syscalls, TLS and wakeups.

    python tools/bench/hbone_micro.py [--requests 20000] [--repeat 5] [--size 1024]
    PYTHONPATH=/tmp/base python tools/bench/hbone_micro.py   # another tree's code (A/B)

Each figure is the best of ``--repeat`` runs (the least disturbed by other work on the box).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.append(str(REPO))  # last: PYTHONPATH=<another tree> measures that tree's code

from ztunnel_py.hbone.connection import Role  # noqa: E402
from ztunnel_py.hbone.events import TunnelRequested  # noqa: E402
from ztunnel_py.proxy.splice import HboneSplice, TcpSide  # noqa: E402
from ztunnel_py.proxy.transport import HboneProtocol  # noqa: E402


class MemoryTransport(asyncio.Transport):
    """Collects what is written; ``pump`` hands it to the peer, as a loop iteration would."""

    def __init__(self) -> None:
        super().__init__()
        self.written: list[bytes] = []
        self.closing = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written.append(bytes(data))

    def get_write_buffer_size(self) -> int:
        return 0

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def abort(self) -> None:
        self.closing = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        pass

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default


def _deliver(proto: HboneProtocol, data: bytes) -> None:
    # What uvloop's TLS transport does for a BufferedProtocol: fill its buffer, tell it.
    buf = proto.get_buffer(len(data))
    buf[: len(data)] = data
    proto.buffer_updated(len(data))


class Wire:
    """The two HBONE transports of a connection; ``pump`` carries bytes until both are quiet."""

    def __init__(self, client: HboneProtocol, server: HboneProtocol) -> None:
        self.client, self.server = client, server
        self.to_server, self.to_client = MemoryTransport(), MemoryTransport()

    def pump(self) -> None:
        moved = True
        while moved:
            moved = False
            for out, proto in ((self.to_server, self.server), (self.to_client, self.client)):
                while out.written:
                    chunks, out.written = out.written, []
                    for data in chunks:
                        _deliver(proto, data)
                    moved = True


async def _pair() -> tuple[Wire, TcpSide, TcpSide, MemoryTransport, MemoryTransport]:
    accepted: list[HboneSplice] = []
    server_tcp = TcpSide()
    server_app = MemoryTransport()
    server_tcp.connection_made(server_app)

    def on_request(proto: HboneProtocol, ev: TunnelRequested) -> None:
        splice = HboneSplice(server_tcp)
        splice.bind(proto, ev.stream_id)
        proto.accept(ev.stream_id, splice)
        splice.start()
        accepted.append(splice)

    client = HboneProtocol(Role.CLIENT)
    server = HboneProtocol(Role.SERVER, on_request=on_request)
    wire = Wire(client, server)
    server.connection_made(wire.to_client)
    client.connection_made(wire.to_server)
    wire.pump()
    client_tcp = TcpSide()
    client_app = MemoryTransport()
    client_tcp.connection_made(client_app)
    splice = HboneSplice(client_tcp)
    sid = client.open_stream("10.0.0.1:7000", [], splice)
    splice.bind(client, sid)
    wire.pump()
    await asyncio.wait_for(splice.established, 5)
    splice.start()
    if not accepted:
        raise RuntimeError("the server accepted no stream")
    return wire, client_tcp, server_tcp, client_app, server_app


def requests_per_cpu(count: int, size: int) -> float:
    """Microseconds of process CPU per request/response exchange (both sides)."""

    async def run() -> float:
        wire, client_tcp, server_tcp, client_app, server_app = await _pair()
        pump = wire.pump
        request = b"q" * size
        answer = b"a" * size
        turn = asyncio.sleep  # one loop turn: a sender's flush runs there (call_soon)
        for _ in range(200):  # warm up: windows, acknowledgement batching, caches
            client_tcp.data_received(request)
            await turn(0)
            pump()
            server_tcp.data_received(answer)
            await turn(0)
            pump()
        server_app.written.clear()
        client_app.written.clear()
        t0 = time.process_time()
        for _ in range(count):
            client_tcp.data_received(request)
            await turn(0)
            pump()
            server_tcp.data_received(answer)
            await turn(0)
            pump()
        spent = time.process_time() - t0
        got = sum(map(len, server_app.written)), sum(map(len, client_app.written))
        if got != (count * size, count * size):
            raise RuntimeError(f"bytes lost: {got} of {count * size} each way")
        return spent / count * 1e6

    return asyncio.run(run())


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--size", type=int, default=1024)
    args = parser.parse_args(argv)
    runs = [requests_per_cpu(args.requests, args.size) for _ in range(args.repeat)]
    print(
        f"{min(runs):.2f} us of Python CPU per {args.size}-byte request/response "
        f"(best of {args.repeat}; all: {', '.join(f'{r:.2f}' for r in runs)})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
