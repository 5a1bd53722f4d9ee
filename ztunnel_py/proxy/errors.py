"""Proxy errors, and the HBONE status each inbound refusal is answered with.

Inbound refusals carry the status that goes on the wire (ztunnel's ``InboundError(Error,
StatusCode)``): 400 for a request we cannot make sense of, 401 for a policy denial, 503 when the
destination cannot be reached or is not known here.
"""

from __future__ import annotations

from ztunnel_py.errors import ZtunnelError


class ProxyError(ZtunnelError):
    """Base class of proxy failures."""


class InboundRefused(ProxyError):
    status = 400

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


class BadRequest(InboundRefused):
    status = 400


class SelfCall(InboundRefused):
    """A tunnel to one of the proxy's own ports (15001, 15006, 15008, 15080)."""

    status = 400


class PolicyDenied(InboundRefused):
    status = 401


class UpstreamUnavailable(InboundRefused):
    status = 503


class UpstreamConnectError(ProxyError):
    """Outbound: the next hop could not be reached; the message carries ztunnel's hints."""

    def __init__(self, target: str, reason: str, *, hbone: bool) -> None:
        self.target = target
        self.reason = reason
        hint = ""
        if hbone and "timed out" in reason:
            hint = ", maybe a NetworkPolicy is blocking HBONE port 15008"
        elif hbone and "refused" in reason:
            hint = " (is the destination enrolled, with its ztunnel listening on port 15008?)"
        super().__init__(f"failed to connect to {target}: {reason}{hint}")
