"""Inbound plaintext (:15006): traffic to the pod that did not come over HBONE.

Authorization runs with no client identity (ztunnel's plaintext path: principals and
namespaces never match). A denied connection is closed (reset); an allowed one is spliced to
its original destination inside the pod, from the client's IP when ``ENABLE_ORIG_SRC`` is on.
"""

from __future__ import annotations

import logging
import socket

from ztunnel_py.proxy.conntrack import tracked
from ztunnel_py.proxy.errors import UpstreamConnectError
from ztunnel_py.proxy.inbound import ILLEGAL_PORTS
from ztunnel_py.proxy.inputs import PodInputs, ProxyInputs
from ztunnel_py.proxy.reporting import report_splice, setup_failure
from ztunnel_py.proxy.server import ProxyServer
from ztunnel_py.proxy.sockets import OriginalDestination
from ztunnel_py.proxy.splice import TcpSplice
from ztunnel_py.proxy.tcp import (
    CONNECT_TIMEOUT_S,
    AcceptedSide,
    connect_tcp,
    sockaddr,
)
from ztunnel_py.rbac.evaluate import ConnectionInfo
from ztunnel_py.state.model import SocketAddr
from ztunnel_py.telemetry.connections import ConnectionRecord, Direction
from ztunnel_py.telemetry.metrics import ResponseFlags

log = logging.getLogger(__name__)


class LocalAddress:
    """The original destination is the accepted socket's own address (TPROXY, sk_lookup)."""

    def original_destination(self, sock: socket.socket) -> SocketAddr:
        return sockaddr(sock.getsockname())


class InboundPlaintextServer(ProxyServer):
    """The :15006 listener of one pod."""

    def __init__(
        self,
        inputs: ProxyInputs,
        pod: PodInputs,
        *,
        connect_timeout_s: float = CONNECT_TIMEOUT_S,
    ) -> None:
        super().__init__("inbound_plaintext", inputs, pod)
        self.original_destination: OriginalDestination = (
            inputs.inbound_original_destination or LocalAddress()
        )
        self.connect_timeout_s = connect_timeout_s

    async def _handle(self, down: AcceptedSide) -> None:
        transport = down.transport
        assert transport is not None
        try:
            src = sockaddr(transport.get_extra_info("peername"))
            dst = self.original_destination.original_destination(transport.get_extra_info("socket"))
        except (OSError, ValueError, TypeError) as e:
            log.warning("inbound plaintext connection refused: %s", e)
            down.reset()
            return
        if dst[1] in ILLEGAL_PORTS:
            log.warning("inbound plaintext to the proxy's own port %d refused", dst[1])
            down.reset()
            self.telemetry.connection_rejected(
                direction=Direction.INBOUND,
                src=src,
                dst=dst,
                error=f"port {dst[1]} is the proxy's own port; refusing a call to itself",
            )
            return
        conn = ConnectionInfo(
            src_ip=src[0],
            src_port=src[1],
            dst_ip=dst[0],
            dst_port=dst[1],
            src_identity=None,
            dst_network=self.config.network,
        )
        record = ConnectionRecord(
            direction=Direction.INBOUND,
            src=src,
            dst=dst,
            dst_identity=str(self.identity),
            dst_workload=self.workload,
            protocol="TCP",
        )
        decision = self.authorizer.check(conn)
        if not decision.allowed:
            log.info("inbound plaintext connection denied: %s: %s", conn, decision.reason)
            down.reset()
            self.telemetry.connection_failed(
                record,
                error=f"connection closed due to policy rejection: {conn}: {decision.reason}",
                flags=ResponseFlags.DENY,
            )
            return
        source = src[0] if self.config.enable_orig_src else None
        try:
            up = await connect_tcp(
                self.sockets, dst, source=source, timeout_s=self.connect_timeout_s
            )
        except (UpstreamConnectError, OSError) as e:
            log.info("inbound plaintext upstream failed: %s", e)
            down.reset()
            error, flags = setup_failure(e)
            self.telemetry.connection_failed(record, error=error, flags=flags)
            return
        splice = TcpSplice(down, up)
        splice.start()
        report_splice(self.telemetry, record, splice, reads_source=True)
        with (
            tracked(self.conntrack, conn, self.workload, splice.abort),
            self.tracker.tracking(splice),
        ):
            await splice.done
