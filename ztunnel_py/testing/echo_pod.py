"""A stand-in pod proxy for tests of the redirection alone: every listener echoes bytes back.

It is a ``redirect.workloads.PodProxyFactory``: the workload manager hands it each pod's three
listening sockets, as it would hand them to the real proxy (no mTLS, no policy).
"""

from __future__ import annotations

import asyncio
import contextlib

from ztunnel_py.redirect.listeners import LISTEN_BACKLOG, EnrollmentError, PodListeners
from ztunnel_py.redirect.workloads import EnrolledPod, PodProxyHandle


class _EchoHandle:
    def __init__(self) -> None:
        self.servers: list[asyncio.Server] = []
        self.conns: set[asyncio.StreamWriter] = set()
        self.idle = asyncio.Event()
        self.idle.set()
        self.stopped = False

    def track(self, writer: asyncio.StreamWriter) -> None:
        self.conns.add(writer)
        self.idle.clear()

    def untrack(self, writer: asyncio.StreamWriter) -> None:
        self.conns.discard(writer)
        if not self.conns:
            self.idle.set()

    async def stop(self, deadline_s: float) -> None:
        for server in self.servers:
            server.close()  # listeners first, so a second daemon's listeners take new connections
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.idle.wait(), deadline_s)
        for writer in list(self.conns):
            writer.transport.abort()
        self.stopped = True


class EchoPodProxyFactory:
    """A stand-in proxy: every listener echoes bytes back, after an optional ``greeting``.

    For tests and bring-up of the redirection alone (no mTLS, no policy). ``started`` lists the
    pods it served, in order.
    """

    def __init__(self, greeting: bytes = b"") -> None:
        self.greeting = greeting
        self.started: list[EnrolledPod] = []
        self.handles: dict[str, _EchoHandle] = {}
        self.fail_next: int = 0  # make the next N starts fail (to exercise the retry path)

    async def start(self, pod: EnrolledPod, sockets: PodListeners) -> PodProxyHandle:
        if self.fail_next > 0:
            self.fail_next -= 1
            raise EnrollmentError("echo factory told to fail")
        handle = _EchoHandle()

        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            handle.track(writer)
            try:
                if self.greeting:
                    writer.write(self.greeting)
                while data := await reader.read(65536):
                    writer.write(data)
                    await writer.drain()
            except ConnectionError:
                pass
            finally:
                handle.untrack(writer)
                writer.close()

        handle.servers = [
            await asyncio.start_server(serve, sock=s, backlog=LISTEN_BACKLOG)
            for s in sockets.sockets()
        ]
        self.started.append(pod)
        self.handles[pod.uid] = handle
        return handle
