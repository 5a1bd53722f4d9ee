"""ztunnel's on-demand DNS: the address of a hostname-only workload, looked up when a
connection needs it (a ServiceEntry with ``resolution: DNS`` whose endpoints have no IPs).

The lookup asks the node's resolvers (resolv.conf, through the pod's ``UpstreamForwarder``, so
from inside the pod's netns) for A and AAAA, and picks at random one address of the IP version
the application used, else one of the other. Each lookup counts in ``istio_on_demand_dns``
with ztunnel's labels (the source workload, and the hostname).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import random

import dns.message
import dns.rdatatype

from ztunnel_py.dns.forwarder import ForwardError, UpstreamForwarder
from ztunnel_py.dns.telemetry import OnDemandDnsMetrics
from ztunnel_py.state.model import IPAddress, Workload

log = logging.getLogger(__name__)


class OnDemandResolver:
    """``proxy.inputs.HostnameResolver`` over one pod's upstream forwarder."""

    def __init__(
        self,
        forwarder: UpstreamForwarder,
        *,
        metrics: OnDemandDnsMetrics | None = None,
        ipv6_enabled: bool = True,
        rng: random.Random | None = None,
    ) -> None:
        self.forwarder = forwarder
        self.metrics = metrics
        self.ipv6_enabled = ipv6_enabled
        self.rng = rng or random.Random()

    async def resolve(self, hostname: str, *, prefer_version: int, source: Workload) -> IPAddress:
        if self.metrics is not None:
            self.metrics.count(source, hostname)
        types = [dns.rdatatype.A]
        if self.ipv6_enabled:
            types.append(dns.rdatatype.AAAA)
        results = await asyncio.gather(
            *(self._lookup(hostname, t) for t in types), return_exceptions=True
        )
        addresses: list[IPAddress] = []
        problems: list[str] = []
        for result in results:
            if isinstance(result, BaseException):
                problems.append(str(result))
            else:
                addresses += result
        if not addresses:
            raise LookupError(
                f"{hostname} has no address" + (f" ({'; '.join(problems)})" if problems else "")
            )
        preferred = [a for a in addresses if a.version == prefer_version]
        return self.rng.choice(preferred or addresses)

    async def _lookup(self, hostname: str, rdtype: dns.rdatatype.RdataType) -> list[IPAddress]:
        query = dns.message.make_query(hostname.rstrip(".") + ".", rdtype)
        try:
            answer = (await self.forwarder.forward(query, query.to_wire())).parsed()
        except ForwardError as e:
            raise LookupError(str(e)) from None
        return [
            ipaddress.ip_address(rdata.address)
            for rrset in answer.answer
            if rrset.rdtype == rdtype
            for rdata in rrset
        ]
