"""An attacker with a mesh certificate, for the adversarial tests of the inbound HBONE server.

``HostileClient`` speaks raw HTTP/2 (h2 with outbound validation off) over mTLS to a pod's
:15008 and writes whatever frames a test asks for: CONNECTs reset at once (rapid reset), header
blocks split over CONTINUATION frames, streams past the advertised limit. ``CountingApp`` is the
upstream application, counting the connections the proxy opened to it and those still open, so
a test can check that nothing the attacker started outlives what it should.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import struct

import h2.config
import h2.connection
import h2.errors
import h2.events

from ztunnel_py.identity.spiffe import Identity
from ztunnel_py.identity.tls import NO_SNI, client_context
from ztunnel_py.testing.proxy_harness import CLIENT_ID, Mesh, connect_request

FRAME_HEADERS = 0x1
FRAME_CONTINUATION = 0x9
FLAG_END_HEADERS = 0x4
_FRAME_HEADER = struct.Struct(">BHBBL")


def frame(ftype: int, flags: int, stream_id: int, payload: bytes) -> bytes:
    n = len(payload)
    return _FRAME_HEADER.pack(n >> 16, n & 0xFFFF, ftype, flags, stream_id) + payload


class CountingApp:
    """An application that holds each connection open until the proxy closes it."""

    def __init__(self) -> None:
        self.opened = 0
        self.open: set[asyncio.StreamWriter] = set()

    async def __call__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.opened += 1
        self.open.add(writer)
        try:
            with contextlib.suppress(ConnectionError):
                await reader.read()
        finally:
            self.open.discard(writer)
            writer.close()


class HostileClient:
    """One mTLS HTTP/2 connection to the server pod's :15008 that misbehaves on request."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.h2 = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, validate_outbound_headers=False)
        )
        self.goaway: h2.events.ConnectionTerminated | None = None
        self.closed = False
        self.statuses: dict[int, int] = {}
        self.resets: dict[int, int] = {}

    @classmethod
    async def connect(
        cls, mesh: Mesh, *, identity: Identity = CLIENT_ID, ctx: ssl.SSLContext | None = None
    ) -> HostileClient:
        ctx = ctx or client_context(mesh.pki.cert(identity))
        reader, writer = await asyncio.open_connection(
            str(mesh.server_ip), 15008, ssl=ctx, server_hostname=NO_SNI
        )
        client = cls(reader, writer)
        client.h2.initiate_connection()
        await client.flush()
        return client

    async def flush(self) -> None:
        data = self.h2.data_to_send()
        if data and not self.writer.is_closing():
            self.writer.write(data)
            with contextlib.suppress(ConnectionError):
                await self.writer.drain()

    async def write_raw(self, data: bytes) -> bool:
        """Write bytes as they are; ``False`` once the server has closed the connection."""
        if self.writer.is_closing():
            return False
        try:
            self.writer.write(data)
            await self.writer.drain()
        except ConnectionError:
            return False
        return True

    def open_connect(self, authority: str) -> int:
        sid = int(self.h2.get_next_available_stream_id())
        self.h2.send_headers(sid, connect_request(authority))
        return sid

    def rapid_reset(self, authority: str) -> int:
        """CONNECT and cancel it at once (CVE-2023-44487)."""
        sid = self.open_connect(authority)
        self.h2.reset_stream(sid, h2.errors.ErrorCodes.CANCEL)
        return sid

    async def read_events(self, timeout_s: float = 0.0) -> None:
        """Read what has arrived (waiting up to ``timeout_s`` for something)."""
        try:
            data = await asyncio.wait_for(self.reader.read(1 << 20), timeout_s or 0.001)
        except TimeoutError:
            return
        except (ConnectionError, ssl.SSLError):
            self.closed = True
            return
        if not data:
            self.closed = True
            return
        try:
            events = self.h2.receive_data(data)
        except h2.exceptions.ProtocolError:
            self.closed = True
            return
        for ev in events:
            if isinstance(ev, h2.events.ConnectionTerminated):
                self.goaway = ev
            elif isinstance(ev, h2.events.ResponseReceived):
                self.statuses[ev.stream_id] = int(dict(ev.headers)[b":status"])
            elif isinstance(ev, h2.events.StreamReset):
                self.resets[ev.stream_id] = int(ev.error_code)
        await self.flush()

    async def until_closed(self) -> None:
        """Read until the server closes the connection (bounded by the caller's timeout)."""
        while not self.closed:
            await self.read_events(1.0)

    def abort(self) -> None:
        self.writer.transport.abort()

    def close(self) -> None:
        self.writer.close()
