"""One pod's proxy: its outbound, inbound HBONE and inbound plaintext servers together.

This is the shape the in-pod workload manager starts for each enrolled pod (its
``PodProxyFactory``): the three listening sockets were created in the pod's netns; upstream
sockets are created there too, through the pod's ``SocketFactory``.
"""

from __future__ import annotations

import asyncio
import socket
from dataclasses import dataclass

from ztunnel_py.hbone.connection import Role
from ztunnel_py.proxy.inbound import InboundServer
from ztunnel_py.proxy.inbound_plain import InboundPlaintextServer
from ztunnel_py.proxy.inputs import PodInputs, ProxyInputs
from ztunnel_py.proxy.outbound import HboneConnector, OutboundServer
from ztunnel_py.proxy.pool import HbonePool
from ztunnel_py.proxy.sockets import SocketFactory
from ztunnel_py.proxy.transport import hbone_settings


@dataclass(slots=True)
class PodProxy:
    outbound: OutboundServer
    inbound: InboundServer
    inbound_plaintext: InboundPlaintextServer

    async def stop(self, deadline_s: float) -> None:
        """Close the listeners, drain connections up to ``deadline_s``, close the rest."""
        await asyncio.gather(
            self.outbound.stop(deadline_s),
            self.inbound.stop(deadline_s),
            self.inbound_plaintext.stop(deadline_s),
        )


def pod_pool(inputs: ProxyInputs, sockets: SocketFactory) -> HbonePool:
    """A pod's pool of outbound HBONE connections, dialled from the pod's netns."""
    config = inputs.config
    return HbonePool(
        HboneConnector(
            certificates=inputs.certificates,
            sockets=sockets,
            settings=hbone_settings(Role.CLIENT, config),
            health=inputs.handshakes,
            revocation=inputs.revocation,
        ),
        max_streams_per_connection=config.pool_max_streams_per_connection,
        unused_release_timeout_s=config.pool_unused_release_timeout_s,
    )


async def start_pod_proxy(
    inputs: ProxyInputs,
    pod: PodInputs,
    listeners: tuple[socket.socket, socket.socket, socket.socket],
) -> PodProxy:
    """Serve ``listeners`` = (outbound :15001, inbound plaintext :15006, inbound HBONE :15008)."""
    outbound_sock, plaintext_sock, hbone_sock = listeners
    proxy = PodProxy(
        outbound=OutboundServer(inputs, pod),
        inbound=InboundServer(inputs, pod),
        inbound_plaintext=InboundPlaintextServer(inputs, pod),
    )
    await proxy.inbound.start(hbone_sock)
    await proxy.inbound_plaintext.start(plaintext_sock)
    await proxy.outbound.start(outbound_sock)
    return proxy
