"""Forwarding to the upstream resolvers of the node's resolv.conf, as a stub resolver does.

Each query goes out as the client sent it, but with a fresh random id, from a fresh socket (a
random source port) made by the caller's ``SocketMaker``: inside the pod's netns and marked
0x539, so neither iptables nor the BPF programs ever capture it again. Each server gets the
query over UDP; a truncated (TC) answer is asked again over TCP from the same server; no
answer within ``timeout`` (or a SERVFAIL/REFUSED) moves on to the next server, for
``attempts`` rounds. Answers must match the query (id, question) to count, so stray or
spoofed datagrams are ignored.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass

import dns.exception
import dns.flags
import dns.message
import dns.rcode

from ztunnel_py.dns.resolvconf import ResolvConf
from ztunnel_py.state.model import IPAddress

log = logging.getLogger(__name__)

SocketMaker = Callable[[int, int], socket.socket]  # (family, type) -> non-blocking socket
_TRY_NEXT = frozenset({dns.rcode.SERVFAIL, dns.rcode.REFUSED, dns.rcode.NOTIMP})
_MAX_UDP_RESPONSE = 65535


class ForwardError(Exception):
    """No upstream resolver gave a usable answer; the client gets SERVFAIL."""


class UpstreamForwarder:
    def __init__(
        self,
        conf: ResolvConf,
        make_socket: SocketMaker,
        *,
        rng: random.Random | None = None,
    ) -> None:
        self.conf = conf
        self._make_socket = make_socket
        self._rng = rng or random.SystemRandom()

    async def forward(self, query: dns.message.Message, wire: bytes) -> Answer:
        """Ask the upstream servers ``query`` (the client's ``wire``, sent as it came but for
        a fresh id); the first usable answer, or ``ForwardError``."""
        ident = self._rng.randrange(1 << 16)
        upstream = _Expected(ident, query)
        wire = struct.pack("!H", ident) + wire[2:]
        problem = "no upstream resolver"
        for _ in range(self.conf.attempts):
            for server in self.conf.nameservers:
                try:
                    async with asyncio.timeout(self.conf.timeout_s):
                        response = await self._udp(server, wire, upstream)
                        if response.message.flags & dns.flags.TC:
                            response = await self._tcp(server, wire, upstream)
                except TimeoutError:
                    problem = f"{_where(server)}: no answer within {self.conf.timeout_s:g}s"
                    continue
                except (OSError, ValueError, dns.exception.DNSException, EOFError) as e:
                    problem = f"{_where(server)}: {e}"
                    continue
                rcode = response.message.rcode()
                if rcode in _TRY_NEXT:
                    problem = f"{_where(server)}: {dns.rcode.to_text(rcode)}"
                    continue
                return response
        raise ForwardError(problem)

    async def _udp(self, server: tuple[IPAddress, int], wire: bytes, query: _Expected) -> Answer:
        loop = asyncio.get_running_loop()
        sock = self._socket(server, socket.SOCK_DGRAM)
        try:
            sock.connect((str(server[0]), server[1]))  # only this server's datagrams reach us
            await loop.sock_sendall(sock, wire)
            while True:
                data = await loop.sock_recv(sock, _MAX_UDP_RESPONSE)
                with contextlib.suppress(dns.exception.DNSException, ValueError):
                    response = _header_and_question(data)
                    if query.answered_by(response):
                        return Answer(response, data)
                log.debug("ignoring a datagram from %s that answers nothing we asked", server[0])
        finally:
            sock.close()

    async def _tcp(self, server: tuple[IPAddress, int], wire: bytes, query: _Expected) -> Answer:
        loop = asyncio.get_running_loop()
        sock = self._socket(server, socket.SOCK_STREAM)
        try:
            await loop.sock_connect(sock, (str(server[0]), server[1]))
            await loop.sock_sendall(sock, struct.pack("!H", len(wire)) + wire)
            (length,) = struct.unpack("!H", await _recv_exactly(loop, sock, 2))
            data = await _recv_exactly(loop, sock, length)
        finally:
            sock.close()
        response = _header_and_question(data)
        if not query.answered_by(response):
            raise ValueError("the TCP answer does not match the query")
        return Answer(response, data)

    def _socket(self, server: tuple[IPAddress, int], kind: int) -> socket.socket:
        family = socket.AF_INET6 if server[0].version == 6 else socket.AF_INET
        return self._make_socket(family, kind)


def _header_and_question(wire: bytes) -> dns.message.Message:
    """Enough of an answer to match it to our query and read its rcode and flags; the records
    are relayed as they came and parsed only when needed (``Answer.parsed``)."""
    return dns.message.from_wire(wire, question_only=True)


@dataclass(frozen=True, slots=True)
class Answer:
    """An upstream answer: its header and question parsed (``message``), its bytes as they
    came (relayed without rendering again)."""

    message: dns.message.Message
    wire: bytes

    def parsed(self) -> dns.message.Message:
        return dns.message.from_wire(self.wire)


@dataclass(frozen=True, slots=True)
class _Expected:
    ident: int
    query: dns.message.Message

    def answered_by(self, response: dns.message.Message) -> bool:
        """Our id, a response, the same question: anything else is stray or spoofed."""
        return (
            response.id == self.ident
            and bool(response.flags & dns.flags.QR)
            and response.opcode() == self.query.opcode()
            and response.question == self.query.question
        )


async def _recv_exactly(loop: asyncio.AbstractEventLoop, sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = await loop.sock_recv(sock, n - len(buf))
        if not chunk:
            raise EOFError("the upstream resolver closed the TCP connection early")
        buf += chunk
    return bytes(buf)


def _where(server: tuple[IPAddress, int]) -> str:
    ip, port = server
    return f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"
