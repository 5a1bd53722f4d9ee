"""Double HBONE: an inner mTLS HBONE connection carried inside one outer HBONE stream.

ztunnel reaches a workload on another network through that network's east-west gateway
(``routing.RouteKind.DOUBLE_HBONE``). The outer CONNECT goes to the gateway on a pooled
connection that proves the gateway's identity; the gateway terminates it and forwards the
stream's bytes, unread, to the final hop's :15008. Inside the stream runs a second TLS
handshake, verified against the service's SANs, and a second CONNECT with the same
``:authority`` plus ``x-forwarded-network``. Inner connections are never pooled: each may reach
another remote endpoint, and the gateway chose it.

The outer stream is spliced (``HboneSplice``) to one end of a socket pair; the inner
connection is an ordinary client ``HboneProtocol`` over the other end, made by the same
handshake as a direct connection. Flow control and half-closes then work as on any splice.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Awaitable, Callable, Iterable

from ztunnel_py.hbone.headers import Baggage, Forwarded, TraceParent, request_headers
from ztunnel_py.proxy.pool import HbonePool, WorkloadKey
from ztunnel_py.proxy.splice import HboneSplice, TcpSide
from ztunnel_py.proxy.transport import HboneProtocol

#: How long the outer stream may take to finish after the inner connection closed (the
#: gateway ends its half once the final hop closed); then it is reset.
OUTER_CLOSE_GRACE_S = 5.0

#: Dials the inner connection: TLS over the given socket, the server's identity checked
#: against ``key.dst_identities`` (``HboneConnector.handshake``).
InnerHandshake = Callable[[socket.socket, WorkloadKey], Awaitable[HboneProtocol]]


def tunnel_headers(
    *, forwarded: Forwarded, baggage: Baggage, traceparent: TraceParent, origin_network: str
) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(outer, inner) request headers, as ztunnel's ``create_hbone_request``: the same
    ``forwarded``, ``baggage`` and ``traceparent`` on both; ``x-forwarded-network`` (this
    node's ``NETWORK``, even when empty) only on the inner one: the gateway needs none, the
    final hop learns from it that the tunnel came through a gateway."""
    outer = request_headers(forwarded=forwarded, baggage=baggage, traceparent=traceparent)
    inner = request_headers(
        forwarded=forwarded,
        baggage=baggage,
        traceparent=traceparent,
        forwarded_network=origin_network,
    )
    return outer, inner


class DoubleTunnel:
    """The outer stream to the gateway and the inner connection inside it."""

    def __init__(self, outer: HboneSplice, inner: HboneProtocol) -> None:
        self.outer = outer
        self.inner = inner

    async def close(self, reason: str) -> None:
        """Close the inner connection, then wait for the outer stream to end (the gateway
        ends its half once the final hop closed); reset it after ``OUTER_CLOSE_GRACE_S``, or
        at once when cancelled (shutdown)."""
        self.inner.close(reason)
        try:
            await asyncio.wait_for(asyncio.shield(self.outer.done), OUTER_CLOSE_GRACE_S)
        except TimeoutError:
            self.outer.abort(f"inner tunnel closed ({reason}), the gateway did not end the stream")
        except asyncio.CancelledError:
            self.outer.abort(f"inner tunnel closed ({reason}), shutting down")
            raise


async def open_double_tunnel(
    pool: HbonePool,
    outer_key: WorkloadKey,
    authority: str,
    outer_headers: Iterable[tuple[str, str]],
    inner_key: WorkloadKey,
    handshake: InnerHandshake,
) -> DoubleTunnel:
    """The outer CONNECT to the gateway (``TunnelRefused`` when it answers another status
    than 200), then the inner connection's handshake through it. The caller opens the inner
    stream on ``DoubleTunnel.inner`` and closes the tunnel when done."""
    outer_end, inner_end = socket.socketpair()
    outer_end.setblocking(False)
    inner_end.setblocking(False)
    side = TcpSide()
    splice = HboneSplice(side)
    try:
        loop = asyncio.get_running_loop()
        await loop.create_connection(lambda: side, sock=outer_end)
        conn, sid = await pool.open_stream(outer_key, authority, outer_headers, splice)
        splice.bind(conn, sid)
        await splice.established
        splice.start()
        inner = await handshake(inner_end, inner_key)
    except BaseException:
        splice.abort("double HBONE setup failed")
        if side.transport is not None:
            side.transport.abort()  # closes outer_end
        else:
            outer_end.close()
        with contextlib.suppress(OSError):
            inner_end.close()  # the handshake closes it on its own failures
        raise
    return DoubleTunnel(splice, inner)
