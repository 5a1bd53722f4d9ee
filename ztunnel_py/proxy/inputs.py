"""What the proxy servers are built from: one ``ProxyInputs`` per daemon, one ``PodInputs`` per pod.

The servers never reach for certificates, policy, original destinations, sockets or metrics
themselves: the composition root hands them these two values (tests hand them fakes), and
``PodProxyStarter`` -> ``start_pod_proxy`` -> each listener pass them on as they are.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, Protocol

from ztunnel_py.config import Config
from ztunnel_py.proxy.authorization import Authorizer, PermitAll, PolicyAuthorizer
from ztunnel_py.proxy.certificates import CertificateSource, HandshakeObserver
from ztunnel_py.proxy.conntrack import ConnectionTracker
from ztunnel_py.proxy.kernel_splice import KernelSplicer
from ztunnel_py.proxy.pool import HbonePool
from ztunnel_py.proxy.revocation import CrlManager
from ztunnel_py.proxy.sockets import OriginalDestination, SocketFactory, SpoofedSources
from ztunnel_py.state.model import IPAddress, Workload
from ztunnel_py.state.store import ProxyState
from ztunnel_py.telemetry.connections import NoTelemetry, TelemetrySink

# ``XDS_ON_DEMAND``: ask istiod for one resource (``network/ip`` or a workload uid) and wait
# until it answered (or gave up); the state store then holds it if it exists.
Demand = Callable[[str], Coroutine[Any, Any, None]]


class HostnameResolver(Protocol):
    """On-demand DNS for hostname-only workloads (ServiceEntry ``resolution: DNS``)."""

    async def resolve(self, hostname: str, *, prefer_version: int, source: Workload) -> IPAddress:
        """One address of ``hostname``, of IP version ``prefer_version`` when it has one.
        Raises ``LookupError`` (with the reason) when it has none."""
        ...


@dataclass(frozen=True, slots=True, kw_only=True)
class ProxyInputs:
    """What every pod's proxy shares.

    ``original_destination``: where a connection accepted on :15001 was going;
    ``inbound_original_destination``: the same for plaintext on :15006 (iptables REDIRECT),
    ``None`` when the accepted socket's own address already is that (sk_lookup).
    ``conntrack``: the live connections re-checked when policies change.
    ``demand``: with ``XDS_ON_DEMAND``, fetch an address istiod has not sent yet.
    ``handshakes``: told how each outbound mTLS handshake went (readiness follows it).
    ``revocation``: with ``CRL_PATH``, checks every handshake's peer and tracks the connection.
    ``spoofed_sources``: told of original-source upstream sockets while they connect (eBPF).
    ``kernel_splice``: same-node connections spliced in the kernel once authorized.
    """

    config: Config
    state: ProxyState
    certificates: CertificateSource
    original_destination: OriginalDestination
    inbound_original_destination: OriginalDestination | None = None
    telemetry: TelemetrySink = field(default_factory=NoTelemetry)
    conntrack: ConnectionTracker | None = None
    rng: random.Random = field(default_factory=random.Random)
    demand: Demand | None = None
    handshakes: HandshakeObserver | None = None
    revocation: CrlManager | None = None
    spoofed_sources: SpoofedSources | None = None
    kernel_splice: KernelSplicer | None = None

    def authorizer_for(self, workload: Workload) -> PolicyAuthorizer:
        """Authorization against the policies of ``workload`` (logged as configured)."""
        return PolicyAuthorizer(
            self.state, workload, info_logging=self.config.authz_policy_info_logging
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class PodInputs:
    """What one enrolled pod adds: its workload, sockets made in its netns, its HBONE pool
    and the authorizer of its inbound connections."""

    workload: Workload
    sockets: SocketFactory
    pool: HbonePool
    authorizer: Authorizer = field(default_factory=PermitAll)
    hostnames: HostnameResolver | None = None  # on-demand DNS, looked up from the pod
