"""A small asyncio HTTP/1.1 server for the admin, metrics and readiness ports.

These ports carry a handful of requests from operators, kubelet and Prometheus, so a tiny
server with hard limits (request size, read timeout) is enough and keeps dependencies down.
"""

from __future__ import annotations

import asyncio
import logging
import urllib.parse
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

MAX_HEADER_BYTES = 16 * 1024
MAX_BODY_BYTES = 1024 * 1024
READ_TIMEOUT_S = 10.0

REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    413: "Payload Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


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


class HttpServer:
    def __init__(self, name: str, routes: Mapping[str, Handler]) -> None:
        self.name = name
        self._routes = dict(routes)
        self._server: asyncio.Server | None = None

    async def start(self, host: str | None, port: int) -> None:
        self._server = await asyncio.start_server(self._serve, host=host, port=port)
        log.info("%s listening on %s", self.name, self.addresses)

    @property
    def addresses(self) -> list[str]:
        if self._server is None:
            return []
        out = []
        for sock in self._server.sockets:
            host, port = sock.getsockname()[:2]
            out.append(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
        return out

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    request = await asyncio.wait_for(_read_request(reader), READ_TIMEOUT_S)
                except _BadRequest as e:
                    await _write(writer, Response.text(e.status, f"{e}\n"), keep_alive=False)
                    return
                if request is None:
                    return
                response = await self._dispatch(request)
                keep_alive = request.headers.get("connection", "").lower() != "close"
                await _write(writer, response, keep_alive=keep_alive)
                if not keep_alive:
                    return
        except (TimeoutError, ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            writer.close()

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


class _BadRequest(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


async def _read_request(reader: asyncio.StreamReader) -> Request | None:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as e:
        if not e.partial:
            return None
        raise _BadRequest(400, "incomplete request") from None
    except asyncio.LimitOverrunError:
        raise _BadRequest(400, "request headers too large") from None
    if len(head) > MAX_HEADER_BYTES:
        raise _BadRequest(400, "request headers too large")
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise _BadRequest(400, f"malformed request line {lines[0]!r}")
    method, target, _version = parts
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep:
            raise _BadRequest(400, f"malformed header line {line!r}")
        headers[name.strip().lower()] = value.strip()
    length_text = headers.get("content-length", "0")
    if not length_text.isdigit():
        raise _BadRequest(400, "bad content-length")
    length = int(length_text)
    if length > MAX_BODY_BYTES:
        raise _BadRequest(413, "request body too large")
    body = await reader.readexactly(length) if length else b""
    url = urllib.parse.urlsplit(target)
    query = urllib.parse.parse_qs(url.query, keep_blank_values=True)
    return Request(method.upper(), url.path or "/", query, headers, body)


async def _write(writer: asyncio.StreamWriter, response: Response, *, keep_alive: bool) -> None:
    reason = REASONS.get(response.status, "")
    head = [
        f"HTTP/1.1 {response.status} {reason}",
        f"Content-Type: {response.content_type}",
        f"Content-Length: {len(response.body)}",
        f"Connection: {'keep-alive' if keep_alive else 'close'}",
    ]
    head += [f"{k}: {v}" for k, v in response.headers.items()]
    writer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + response.body)
    await writer.drain()
