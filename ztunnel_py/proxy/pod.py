"""One pod's proxy: its outbound, inbound HBONE and inbound plaintext servers together.

This is the shape the in-pod workload manager starts for each enrolled pod (its
``PodProxyFactory``): the three listening sockets were created in the pod's netns; upstream
sockets are created there too, through the pod's ``SocketFactory``.
"""

from __future__ import annotations

import asyncio
import random
import socket
from dataclasses import dataclass

from ztunnel_py.config import Config
from ztunnel_py.proxy.conntrack import ConnectionTracker
from ztunnel_py.proxy.inbound import InboundServer
from ztunnel_py.proxy.inbound_plain import InboundPlaintextServer
from ztunnel_py.proxy.outbound import OutboundServer
from ztunnel_py.proxy.pool import HbonePool
from ztunnel_py.proxy.seams import (
    Authorizer,
    CertificateSource,
    Demand,
    OriginalDestination,
    SocketFactory,
    TelemetrySink,
)
from ztunnel_py.state.model import Workload
from ztunnel_py.state.store import ProxyState


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


async def start_pod_proxy(
    *,
    workload: Workload,
    listeners: tuple[socket.socket, socket.socket, socket.socket],
    state: ProxyState,
    config: Config,
    certificates: CertificateSource,
    pool: HbonePool,
    sockets: SocketFactory,
    original_destination: OriginalDestination,
    inbound_original_destination: OriginalDestination | None = None,
    authorizer: Authorizer | None = None,
    telemetry: TelemetrySink | None = None,
    rng: random.Random | None = None,
    conntrack: ConnectionTracker | None = None,
    demand: Demand | None = None,
) -> PodProxy:
    """Serve ``listeners`` = (outbound :15001, inbound plaintext :15006, inbound HBONE :15008).

    ``inbound_original_destination``: where plaintext arriving on :15006 was going (iptables
    REDIRECT); ``None`` when the accepted socket's own address already is that (sk_lookup).
    """
    outbound_sock, plaintext_sock, hbone_sock = listeners
    proxy = PodProxy(
        outbound=OutboundServer(
            workload=workload,
            state=state,
            pool=pool,
            sockets=sockets,
            original_destination=original_destination,
            config=config,
            telemetry=telemetry,
            rng=rng,
            demand=demand,
            conntrack=conntrack,
        ),
        inbound=InboundServer(
            workload=workload,
            state=state,
            certificates=certificates,
            sockets=sockets,
            config=config,
            authorizer=authorizer,
            telemetry=telemetry,
            conntrack=conntrack,
        ),
        inbound_plaintext=InboundPlaintextServer(
            workload=workload,
            sockets=sockets,
            original_destination=inbound_original_destination,
            config=config,
            authorizer=authorizer,
            telemetry=telemetry,
            conntrack=conntrack,
        ),
    )
    await proxy.inbound.start(hbone_sock)
    await proxy.inbound_plaintext.start(plaintext_sock)
    await proxy.outbound.start(outbound_sock)
    return proxy
