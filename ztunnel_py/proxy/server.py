"""What the three listeners of a pod share: start on a listening socket, stop, drain."""

from __future__ import annotations

import asyncio
import socket

from ztunnel_py.proxy.inputs import PodInputs, ProxyInputs
from ztunnel_py.proxy.tcp import LISTEN_BACKLOG, AcceptedSide, ServerConnections
from ztunnel_py.state.node_identities import workload_identity


class ProxyServer:
    """One listener of one pod. Plain TCP servers implement ``_handle`` (one task per accepted
    connection); a server speaking another protocol overrides ``_listen``."""

    def __init__(self, name: str, inputs: ProxyInputs, pod: PodInputs) -> None:
        self.inputs = inputs
        self.workload = pod.workload
        self.sockets = pod.sockets
        self.authorizer = pod.authorizer
        self.config = inputs.config
        self.telemetry = inputs.telemetry
        self.conntrack = inputs.conntrack
        self.identity = workload_identity(pod.workload)
        self.tracker = ServerConnections(name)
        self._server: asyncio.AbstractServer | None = None

    async def start(self, listener: socket.socket) -> None:
        self._server = await self._listen(listener)

    async def stop(self, deadline_s: float = 5.0) -> None:
        """Close the listener, let connections finish up to ``deadline_s``, close the rest."""
        if self._server is not None:
            self._server.close()
        self._draining()
        await self.tracker.drain(deadline_s)
        self._drained()

    async def _listen(self, listener: socket.socket) -> asyncio.AbstractServer:
        loop = asyncio.get_running_loop()
        return await loop.create_server(
            lambda: AcceptedSide(self.tracker, self._handle), sock=listener, backlog=LISTEN_BACKLOG
        )

    async def _handle(self, down: AcceptedSide) -> None:
        raise NotImplementedError(f"{type(self).__name__} serves no plain TCP connections")

    def _draining(self) -> None:
        """The listener is closed; live connections are about to be drained."""

    def _drained(self) -> None:
        """The drain deadline passed; what is left is about to be closed."""
