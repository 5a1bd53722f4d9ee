"""ztunnel's own HBONE listener, so that Prometheus in the mesh can scrape the daemon over the
mesh (ztunnel ``ProxyFactory::create_ztunnel_self_proxy_listener``).

As ztunnel: only in shared mode and only when ``POD_NAME``, ``POD_NAMESPACE`` and
``SERVICE_ACCOUNT`` name the daemon's own pod (the chart sets them from the Downward API). The
daemon's pod is then a workload like any other: once xDS has sent it (found by name, namespace
and service account), an inbound HBONE server for it listens on :15008 of the pod's addresses in
the daemon's own network namespace (ztunnel binds the wildcard; the pod's addresses are where
peers send HBONE, and a daemon that does not run in its pod's namespace gets a clear error
instead of a port taken on the host), with the certificate of the daemon's identity
(``spiffe://<td>/ns/<POD_NAMESPACE>/sa/<SERVICE_ACCOUNT>``). A peer's CONNECT to
``<daemon pod IP>:15020`` reaches the metrics port; the daemon pod's authorization policies
apply as to any inbound connection (401 when denied), and the proxy's own ports are refused
(400). Unlike other inbound connections, the upstream connection never takes the client's
source address (ztunnel's ``disable_inbound_freebind``): the target is the daemon itself.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import socket
from collections.abc import Callable, Coroutine
from typing import Any

from ztunnel_py.config import PORT_HBONE, Config, ProxyMode
from ztunnel_py.proxy.inbound import InboundServer
from ztunnel_py.proxy.inputs import PodInputs, ProxyInputs
from ztunnel_py.proxy.pod import pod_pool
from ztunnel_py.proxy.sockopt import PodSocketFactory, set_mark
from ztunnel_py.proxy.tcp import LISTEN_BACKLOG
from ztunnel_py.state.model import Workload
from ztunnel_py.state.store import ChangeSet

log = logging.getLogger(__name__)

Spawn = Callable[[str, Coroutine[Any, Any, None]], None]


def self_listener_wanted(config: Config) -> bool:
    """ztunnel's condition: shared mode and the daemon's own pod named by the Downward API."""
    return config.proxy_mode is ProxyMode.SHARED and bool(
        config.pod_name and config.pod_namespace and config.service_account
    )


class SelfListener:
    """Waits for the daemon's own workload in the state, then serves HBONE for it."""

    def __init__(
        self,
        inputs: ProxyInputs,
        spawn: Spawn,
        *,
        port: int = PORT_HBONE,
    ) -> None:
        config = inputs.config
        # The upstream is the daemon itself: never connect from the client's address.
        self.inputs = dataclasses.replace(
            inputs, config=dataclasses.replace(config, enable_orig_src=False)
        )
        self.spawn = spawn
        self.port = port
        self.servers: list[InboundServer] = []  # one per address
        self.addresses: list[str] = []  # where it listens
        self.workload: Workload | None = None
        self.error: str | None = None
        self._starting = False

    def find_workload(self) -> Workload | None:
        config = self.inputs.config
        return self.inputs.state.find_workload(
            namespace=config.pod_namespace,
            name=config.pod_name,
            service_account=config.service_account,
        )

    def state_changed(self, _changes: ChangeSet | None = None) -> None:
        """Hub follower: start once the daemon's own workload is known."""
        if self._starting or self.servers:
            return
        workload = self.find_workload()
        if workload is None:
            return
        self._starting = True
        self.spawn("self HBONE listener", self._start(workload))

    async def _start(self, workload: Workload) -> None:
        config = self.inputs.config
        sockets = PodSocketFactory(config)  # the daemon's own namespace
        pod = PodInputs(
            workload=workload,
            sockets=sockets,
            pool=pod_pool(self.inputs, sockets),  # unused inbound; PodInputs holds one
            authorizer=self.inputs.authorizer_for(workload),
        )
        listeners: list[socket.socket] = []
        try:
            # The pod's own addresses, where peers send HBONE (ztunnel binds the wildcard in
            # its pod; an address this namespace does not hold is a clear error instead).
            for ip in workload.workload_ips:
                if ip.version == 6 and not config.ipv6_enabled:
                    continue
                listeners.append(self._listen_socket(str(ip)))
            if not listeners:
                raise OSError(0, f"the workload {workload.namespace}/{workload.name} has no IP")
        except OSError as e:
            for sock in listeners:
                sock.close()
            self._failed(f"cannot listen on :{self.port} at {_ips(workload)}: {e.strerror or e}")
            return
        servers = [InboundServer(self.inputs, pod) for _ in listeners]
        try:
            for server, sock in zip(servers, listeners, strict=True):
                await server.start(sock)
        except Exception as e:  # noqa: BLE001 (its certificate, usually: retried on the next change)
            for server in servers:
                await server.stop(0)
            for sock in listeners:
                sock.close()
            self._failed(f"cannot serve as {servers[0].identity}: {e}")
            self._starting = False
            return
        self.error = None
        self.servers, self.workload = servers, workload
        self.addresses = [_format(s.getsockname()) for s in listeners]
        log.info(
            "ztunnel self HBONE listener on %s as %s (workload %s/%s)",
            ", ".join(self.addresses),
            servers[0].identity,
            workload.namespace,
            workload.name,
        )

    def _failed(self, error: str) -> None:
        # The daemon serves its pods on without this listener.
        self.error = error
        log.error("ztunnel self HBONE listener not started: %s", error)

    def _listen_socket(self, host: str) -> socket.socket:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            set_mark(sock, self.inputs.config.packet_mark)
            sock.bind((host, self.port))
            sock.listen(LISTEN_BACKLOG)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        return sock

    async def stop(self, deadline_s: float) -> None:
        for server in self.servers:
            with contextlib.suppress(Exception):
                await server.stop(deadline_s)

    def dump(self) -> dict[str, Any]:
        w = self.workload
        return {
            "listening": self.addresses,
            "workload": f"{w.namespace}/{w.name}" if w is not None else None,
            "identity": str(self.servers[0].identity) if self.servers else None,
            "error": self.error,
        }


def _ips(workload: Workload) -> str:
    return ", ".join(str(ip) for ip in workload.workload_ips) or "<no IP>"


def _format(sockname: Any) -> str:
    host, port = sockname[0], sockname[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
