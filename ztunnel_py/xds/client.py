"""The grpc.aio adapter that runs a ``DeltaSession`` against istiod's ADS stream.

One stream per connection, reconnect forever with ztunnel's policy (``src/xds/client.rs``
``run_loop``): backoff starts at 10 ms and doubles up to 15 s after connection errors and
unexpected statuses; reconnects at once (10 ms) on ``UNKNOWN``, ``CANCELLED``,
``DEADLINE_EXCEEDED``, ``UNAVAILABLE`` "transport is closing" / "received prior goaway"
(istiod's max-connection-age rotation) and on a clean end of stream. One difference: a stream
that delivered at least one response resets the backoff, so a long-lived connection that breaks
does not inherit the delay of failures from hours before.

The state survives reconnects: the session echoes held versions, and ``apply`` is only given
what changed. Each response is applied *before* on-demand waiters are woken.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from envoy.service.discovery.v3 import ads_pb2_grpc
from prometheus_client import CollectorRegistry, Counter

from ztunnel_py.config import Config
from ztunnel_py.istiod_auth import AuthError, call_metadata, secure_channel
from ztunnel_py.state.store import ChangeSet, UpdateBatch
from ztunnel_py.xds.delta import (
    DeltaDiscoveryRequest,
    DeltaDiscoveryResponse,
    DeltaSession,
    Signal,
)
from ztunnel_py.xds.handlers import ADDRESS_TYPE, istio_session

log = logging.getLogger(__name__)

INITIAL_BACKOFF_S = 0.010
MAX_BACKOFF_S = 15.0
_RECONNECT_CODES = frozenset(
    {grpc.StatusCode.UNKNOWN, grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED}
)
_ROTATION_MESSAGES = ("transport is closing", "received prior goaway")
_CREDENTIAL_CODES = frozenset({grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED})
_MASKED_STATUS = "Internal error from Core"


class TerminationReason(enum.Enum):
    """``istio_xds_connection_terminations_total{reason}`` values (ztunnel's)."""

    CONNECTION_ERROR = "ConnectionError"
    ERROR = "Error"
    RECONNECT = "Reconnect"
    COMPLETE = "Complete"


class XdsMetrics:
    """ztunnel's xDS client metrics, registered on the given registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.connection_terminations = Counter(
            "istio_xds_connection_terminations",
            "The total number of completed connections to xds server (unstable)",
            ["reason"],
            registry=registry,
        )
        self.messages = Counter(
            "istio_xds_message",
            "Total number of messages received (unstable)",
            ["url"],
            registry=registry,
        )
        self.message_bytes = Counter(
            "istio_xds_message_bytes",
            "Total number of bytes received (unstable)",
            ["url"],
            unit="bytes",
            registry=registry,
        )

    def record_termination(self, reason: TerminationReason) -> None:
        self.connection_terminations.labels(reason=reason.value).inc()

    def record_response(self, resp: DeltaDiscoveryResponse) -> None:
        self.messages.labels(url=resp.type_url).inc()
        size = sum(len(r.resource.value) for r in resp.resources)
        self.message_bytes.labels(url=resp.type_url).inc(size)


def classify(code: grpc.StatusCode, details: str, *, got_response: bool) -> TerminationReason:
    """How a stream that ended with ``code``/``details`` counts, as ztunnel's run_loop."""
    if code in _RECONNECT_CODES:
        return TerminationReason.RECONNECT
    if code is grpc.StatusCode.UNAVAILABLE:
        if any(m in details for m in _ROTATION_MESSAGES):
            return TerminationReason.RECONNECT
        if not got_response:
            return TerminationReason.CONNECTION_ERROR
    return TerminationReason.ERROR


def next_backoff(reason: TerminationReason, backoff: float) -> float:
    """The delay before the next attempt, given the previous delay."""
    if reason in (TerminationReason.RECONNECT, TerminationReason.COMPLETE):
        return INITIAL_BACKOFF_S
    return min(MAX_BACKOFF_S, backoff * 2)


class XdsClient:
    """Keeps one delta ADS stream to ``XDS_ADDRESS`` alive and feeds ``apply`` with batches."""

    def __init__(
        self,
        config: Config,
        apply: Callable[[UpdateBatch], ChangeSet],
        metrics: XdsMetrics,
        *,
        on_ready: Callable[[], None],
    ) -> None:
        if config.xds_address is None:
            raise ValueError("XdsClient needs XDS_ADDRESS (it is unset or empty)")
        self._config = config
        self._address = config.xds_address
        self._apply = apply
        self._metrics = metrics
        self._on_ready = on_ready
        self._session = istio_session(config)
        self._outbound: asyncio.Queue[DeltaDiscoveryRequest] | None = None
        self._waiters: dict[str, list[asyncio.Future[None]]] = {}
        self.connection_id = 0
        self.connected = False
        self.last_error = ""

    @property
    def session(self) -> DeltaSession:
        return self._session

    @property
    def ready(self) -> bool:
        return self._session.ready

    # ------------------------------------------------------------------ main loop

    async def run(self) -> None:
        """Connect, stream, reconnect; returns only by cancellation."""
        backoff = INITIAL_BACKOFF_S
        while True:
            self.connection_id += 1
            reason, got_response = await self._run_once()
            self._metrics.record_termination(reason)
            backoff = next_backoff(reason, INITIAL_BACKOFF_S if got_response else backoff)
            log.debug(
                "xDS stream ended",
                extra={
                    "fields": {
                        "id": self.connection_id,
                        "reason": reason.value,
                        "retry_in": backoff,
                    }
                },
            )
            await asyncio.sleep(backoff)

    async def _run_once(self) -> tuple[TerminationReason, bool]:
        got_response = False
        try:
            channel = secure_channel(
                self._address, self._config.xds_root_cert, self._config.alt_xds_hostname
            )
        except AuthError as e:
            self._fail(f"xDS: {e}")
            return TerminationReason.ERROR, False
        try:
            async with channel:
                metadata = call_metadata(self._config, extra_headers=self._config.xds_headers)
                queue: asyncio.Queue[DeltaDiscoveryRequest] = asyncio.Queue()
                for req in self._session.initial_requests():
                    queue.put_nowait(req)
                self._outbound = queue
                stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel)
                call = stub.DeltaAggregatedResources(_drain(queue), metadata=metadata)
                async for resp in call:
                    if not got_response:
                        got_response = True
                        self.connected = True
                        log.info(
                            "xDS stream established",
                            extra={"fields": {"id": self.connection_id, "address": self._address}},
                        )
                    self._handle(resp, queue)
            log.warning("xDS stream completed by the server; reconnecting")
            return TerminationReason.COMPLETE, got_response
        except AuthError as e:
            self._fail(f"xDS: {e}")
            return TerminationReason.ERROR, got_response
        except grpc.aio.AioRpcError as e:
            code, details = e.code(), e.details() or ""
            reason = classify(code, details, got_response=got_response)
            self._log_status(code, details, reason)
            return reason, got_response
        finally:
            self._outbound = None
            self.connected = False

    def _handle(
        self, resp: DeltaDiscoveryResponse, queue: asyncio.Queue[DeltaDiscoveryRequest]
    ) -> None:
        self._metrics.record_response(resp)
        batch, reply = self._session.on_response(resp)
        outcome = self._session.last_outcome
        assert outcome is not None
        if not batch.is_empty:
            self._apply(batch)
        for key in outcome.satisfied:
            for fut in self._waiters.get(key, ()):
                if not fut.done():
                    fut.set_result(None)
        if outcome.unknown_type:
            log.error("xDS: unknown type, ACKing", extra={"fields": {"type_url": outcome.type_url}})
        elif outcome.signal is Signal.NACK:
            log.error(
                "xDS: rejected resources, sending NACK",
                extra={
                    "fields": {
                        "type_url": outcome.type_url,
                        "nonce": outcome.nonce,
                        "error": outcome.error_message,
                    }
                },
            )
        queue.put_nowait(reply)
        if outcome.became_ready:
            log.info("xDS: initial configuration received from every watched type")
            self._on_ready()

    def _fail(self, message: str) -> None:
        self.last_error = message
        log.error(message)

    def _credentials_hint(self) -> str:
        return (
            f"Check that AUTH_TOKEN ({self._config.auth_token}) holds a current service-account "
            f"token with audience istio-ca, that CLUSTER_ID ({self._config.cluster_id}) names this "
            "cluster, and that POD_NAMESPACE/SERVICE_ACCOUNT match the token's identity"
        )

    def _log_status(self, code: grpc.StatusCode, details: str, reason: TerminationReason) -> None:
        status = f"{code.name}: {details}"
        if code in _CREDENTIAL_CODES:
            self._fail(
                f"xDS: istiod at {self._address} refused our credentials ({status}). "
                + self._credentials_hint()
            )
        elif code is grpc.StatusCode.INTERNAL and details == _MASKED_STATUS and not self.connected:
            # grpcio's aio client can replace the status of a stream the server ended at once
            # (grpc/grpc#36066); an immediate refusal is most often about credentials.
            self._fail(
                f"xDS: istiod at {self._address} ended the stream before any response ({status}; "
                "gRPC may hide the server's status, such as PERMISSION_DENIED, behind this). "
                + self._credentials_hint()
            )
        elif reason is TerminationReason.RECONNECT:
            self.last_error = status
            log.debug("xDS stream terminated, reconnecting", extra={"fields": {"status": status}})
        elif reason is TerminationReason.CONNECTION_ERROR:
            self._fail(f"xDS: cannot connect to {self._address}: {status}")
        else:
            self._fail(f"xDS: stream error from {self._address}: {status}")

    # ------------------------------------------------------------------ on demand

    async def fetch_on_demand(self, key: str, timeout: float) -> None:  # noqa: ASYNC109
        """Ask istiod for one Address and wait until a response mentions it (or ``timeout``).

        Returns silently either way: the caller re-reads the state, as ztunnel does. Without
        ``XDS_ON_DEMAND`` everything is pushed anyway, so this returns at once.
        """
        if not self._session.on_demand:
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(key, []).append(fut)
        request = self._session.subscribe(ADDRESS_TYPE, key)
        if self._outbound is not None:
            self._outbound.put_nowait(request)
        # Not connected: the key is held with an empty version and goes out on reconnect.
        try:
            await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            log.debug("xDS on-demand lookup timed out", extra={"fields": {"key": key}})
        finally:
            waiters = self._waiters.get(key, [])
            if fut in waiters:
                waiters.remove(fut)
            if not waiters:
                self._waiters.pop(key, None)
                self._session.forget_pending(key)

    # ------------------------------------------------------------------ introspection

    def dump(self) -> dict[str, Any]:
        """The xDS section of ``/config_dump``."""
        return {
            "address": self._address,
            "connected": self.connected,
            "connectionId": self.connection_id,
            "lastError": self.last_error or None,
            **self._session.dump(),
        }


async def _drain(
    queue: asyncio.Queue[DeltaDiscoveryRequest],
) -> AsyncIterator[DeltaDiscoveryRequest]:
    while True:
        yield await queue.get()
