"""The HTTP/1.1 server of the admin, metrics and readiness ports, on ``h11``.

``h11`` does the parsing and framing (sans-I/O, like the ``h2`` the tunnel uses); this module
is the asyncio glue plus the limits that keep a careless or hostile client from hurting the
daemon: the size of the request head and body, the number of open connections, how long a
connection may sit idle and how long one request may take to arrive. A client past a limit
gets an HTTP error when it can still read one (400, 408, 413, 431) or a closed connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import urllib.parse
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field

import h11

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Limits:
    max_header_bytes: int = 16 * 1024  # request line + headers
    max_body_bytes: int = 1024 * 1024
    max_connections: int = 64  # beyond this, new connections are closed at once
    idle_timeout_s: float = 30.0  # a kept-alive connection with no request in flight
    request_timeout_s: float = 10.0  # from the first byte of a request to its last


REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    413: "Content Too Large",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
}

_READ_CHUNK = 64 * 1024


@dataclass(frozen=True, slots=True)
class Request:
    method: str
    path: str
    query: Mapping[str, list[str]]
    headers: Mapping[str, str]
    body: bytes = b""


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    body: bytes = b""
    content_type: str = "text/plain; charset=utf-8"
    headers: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def text(cls, status: int, text: str) -> Response:
        return cls(status, text.encode())


Handler = Callable[[Request], Awaitable[Response]]


class _Refused(Exception):
    """The request cannot be served; answer ``status`` (when the client can read it) and close."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class HttpServer:
    def __init__(
        self, name: str, routes: Mapping[str, Handler], *, limits: Limits | None = None
    ) -> None:
        self.name = name
        self.limits = limits or Limits()
        self._routes = dict(routes)
        self._servers: list[asyncio.Server] = []
        self._open = 0
        self.refused_connections = 0  # over max_connections, for the debug views

    @property
    def routes(self) -> list[str]:
        return sorted(self._routes)

    @property
    def open_connections(self) -> int:
        return self._open

    async def start(self, host: str | Sequence[str] | None, port: int) -> None:
        """Listen on ``host`` (``None``: every address; a list: each of them, same port).

        In a list, an address the host does not have (``::1`` with IPv6 disabled) is skipped;
        the first one must work.
        """
        hosts: list[str | None] = [host] if host is None or isinstance(host, str) else [*host]
        for i, h in enumerate(hosts):
            try:
                server = await asyncio.start_server(self._serve, host=h, port=port)
            except OSError as e:
                if i == 0 or e.errno not in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT):
                    raise
                log.info("%s: not listening on %s: %s", self.name, h, e)
                continue
            self._servers.append(server)
            port = port or int(server.sockets[0].getsockname()[1])  # port 0: same one for all
        log.info("%s listening on %s", self.name, self.addresses)

    @property
    def addresses(self) -> list[str]:
        out = []
        for server in self._servers:
            for sock in server.sockets:
                host, port = sock.getsockname()[:2]
                out.append(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
        return out

    @property
    def port(self) -> int:
        assert self._servers
        return int(self._servers[0].sockets[0].getsockname()[1])

    async def close(self) -> None:
        for server in self._servers:
            server.close()
        for server in self._servers:
            await server.wait_closed()
        self._servers = []

    # ------------------------------------------------------------------ one connection

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._open >= self.limits.max_connections:
            self.refused_connections += 1
            writer.close()
            return
        self._open += 1
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=self.limits.max_header_bytes)
        try:
            while True:
                try:
                    request = await self._read_request(conn, reader)
                except _Refused as e:
                    await self._refuse(conn, writer, e)
                    return
                if request is None:
                    return
                response = await self._dispatch(request)
                await _send(conn, writer, response, head_only=request.method == "HEAD")
                if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                    return  # h11 decided the connection must close (Connection: close, ...)
                conn.start_next_cycle()
        except (ConnectionError, asyncio.IncompleteReadError, h11.LocalProtocolError):
            return
        finally:
            self._open -= 1
            writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await writer.wait_closed()

    async def _read_request(
        self, conn: h11.Connection, reader: asyncio.StreamReader
    ) -> Request | None:
        """The next request, or ``None`` when the client closed or idled out between requests."""
        limits = self.limits
        buffered, _ = conn.trailing_data  # a pipelined request may already be here
        if not buffered:
            try:
                data = await asyncio.wait_for(reader.read(_READ_CHUNK), limits.idle_timeout_s)
            except TimeoutError:
                return None  # an idle keep-alive connection: just close it
            if not data:
                return None
            _feed(conn, data)
        try:
            async with asyncio.timeout(limits.request_timeout_s):
                head = await _next_event(conn, reader)
                if not isinstance(head, h11.Request):
                    raise _Refused(400, "expected a request")
                # h11 bounds a head that arrives in pieces; one that came whole is checked here.
                size = len(head.target) + sum(len(k) + len(v) + 4 for k, v in head.headers)
                if size > limits.max_header_bytes:
                    raise _Refused(431, f"request head over {limits.max_header_bytes} bytes")
                headers = {
                    k.decode("latin-1").lower(): v.decode("latin-1") for k, v in head.headers
                }
                length = headers.get("content-length", "")
                if length.isdigit() and int(length) > limits.max_body_bytes:
                    raise _Refused(413, f"request body over {limits.max_body_bytes} bytes")
                body = bytearray()
                while not isinstance(event := await _next_event(conn, reader), h11.EndOfMessage):
                    if isinstance(event, h11.Data):
                        body += event.data
                        if len(body) > limits.max_body_bytes:
                            raise _Refused(413, f"request body over {limits.max_body_bytes} bytes")
        except TimeoutError:
            raise _Refused(408, "request not received in time") from None
        target = urllib.parse.urlsplit(head.target.decode("latin-1"))
        query = urllib.parse.parse_qs(target.query, keep_blank_values=True)
        method = head.method.decode("latin-1").upper()
        return Request(method, target.path or "/", query, headers, bytes(body))

    async def _refuse(
        self, conn: h11.Connection, writer: asyncio.StreamWriter, refusal: _Refused
    ) -> None:
        log.debug("%s: refused a request: %s", self.name, refusal)
        if conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return  # too late for a response; the connection just closes
        with contextlib.suppress(ConnectionError, h11.LocalProtocolError):
            response = Response.text(refusal.status, f"{refusal}\n")
            await _send(conn, writer, response, head_only=False, close=True)

    async def _dispatch(self, request: Request) -> Response:
        handler = self._routes.get(request.path)
        if handler is None:
            known = ", ".join(sorted(self._routes))
            return Response.text(404, f"no such endpoint {request.path}; try one of: {known}\n")
        try:
            return await handler(request)
        except Exception:  # a handler bug must not take the admin port down
            log.exception("%s: handler for %s failed", self.name, request.path)
            return Response.text(500, "internal error, see the daemon log\n")


def _feed(conn: h11.Connection, data: bytes) -> None:
    try:
        conn.receive_data(data)
    except h11.RemoteProtocolError as e:
        raise _Refused(e.error_status_hint, f"bad request: {e}") from None


async def _next_event(conn: h11.Connection, reader: asyncio.StreamReader) -> h11.Event:
    """The next h11 event, reading as needed; a client gone mid-request is a reset."""
    while True:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError as e:
            raise _Refused(e.error_status_hint, f"bad request: {e}") from None
        if event is h11.NEED_DATA:
            _feed(conn, await reader.read(_READ_CHUNK))
            continue
        if event is h11.PAUSED or isinstance(event, h11.ConnectionClosed):
            raise ConnectionResetError("client closed the connection mid-request")
        assert isinstance(event, h11.Event)
        return event


async def _send(
    conn: h11.Connection,
    writer: asyncio.StreamWriter,
    response: Response,
    *,
    head_only: bool,
    close: bool = False,
) -> None:
    headers = [
        ("Content-Type", response.content_type),
        ("Content-Length", str(len(response.body))),
        *response.headers.items(),
    ]
    if close:
        headers.append(("Connection", "close"))
    reason = REASONS.get(response.status, "").encode()
    out = conn.send(h11.Response(status_code=response.status, headers=headers, reason=reason))
    if response.body and not head_only:
        out = (out or b"") + (conn.send(h11.Data(data=response.body)) or b"")
    out = (out or b"") + (conn.send(h11.EndOfMessage()) or b"")
    writer.write(out)
    await writer.drain()
