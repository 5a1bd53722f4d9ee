"""The proxy's ``TelemetrySink``: Istio's TCP metrics and ztunnel's access log per connection.

``ProxyTelemetry`` turns what the servers report (``telemetry.connections``) into the counters of
``telemetry.metrics`` and the lines of ``telemetry.access_log``:

* ``connection_opened``: labels (reporter, workloads, service, principals, security policy),
  the opened counter, a DEBUG ``connection opened`` line; the connection stays live here with
  its ``progress`` reader;
* ``flush()``: adds the bytes every live connection moved since the last flush, so the byte
  counters grow while connections live (call it before every scrape; it only reads two ints
  per connection);
* ``connection_closed``: the last bytes, the closed counter (and failed, with a failure flag),
  and the ``connection complete`` line;
* ``connection_failed``: a connection that never got spliced is opened, closed and failed at
  once with its flag, and logs ``connection complete`` at ERROR;
* ``connection_rejected``: a refusal before anything was known logs ``connection failed``.

Bytes arrive as (toward the destination, back to the source) and are handed to the
``ConnectionRecorder`` from the reporting workload's side: the client sends what goes toward
the destination (``reporter=source``), the server receives it (``reporter=destination``).

Everything runs on the event loop's thread: the servers report from it, and the metrics
endpoint calls ``flush()`` from it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

from ztunnel_py.hbone.headers import format_authority
from ztunnel_py.state.model import Service, SocketAddr, Workload
from ztunnel_py.state.store import ProxyState
from ztunnel_py.telemetry.access_log import (
    ACCESS_TARGET,
    AccessLogContext,
    log_connection_complete,
    log_connection_failed,
    log_connection_opened,
)
from ztunnel_py.telemetry.connections import ConnectionRecord, Direction, Progress
from ztunnel_py.telemetry.metrics import (
    ConnectionLabels,
    ConnectionMetrics,
    ConnectionRecorder,
    Reporter,
    ResponseFlags,
    SecurityPolicy,
)


@dataclass(slots=True, eq=False)
class _Live:
    record: ConnectionRecord
    recorder: ConnectionRecorder
    log: AccessLogContext
    progress: Progress | None
    started: float
    toward: int = 0  # bytes toward the destination counted so far
    back: int = 0  # bytes back to the source counted so far


class ProxyTelemetry:
    """Metrics and access log for the connections of every server of this proxy."""

    def __init__(
        self,
        metrics: ConnectionMetrics,
        state: ProxyState,
        *,
        network: str = "",
        clock: Callable[[], float] = time.monotonic,
        logger: logging.Logger | None = None,
        access_log_errors_only: bool = False,
    ) -> None:
        """``access_log_errors_only`` (``ACCESS_LOG_ERRORS_ONLY``, beyond ztunnel): only the
        lines of connections that failed, were refused or denied; metrics count everything."""
        self._metrics = metrics
        self._errors_only = access_log_errors_only
        self._state = state
        self._network = network
        self._clock = clock
        self._logger = logger or logging.getLogger(ACCESS_TARGET)
        # Keyed by id(record): the servers pass the same record object to open and close, and
        # the entry holds the record, so its id cannot be reused while it is live.
        self._live: dict[int, _Live] = {}

    # ------------------------------------------------------------------ TelemetrySink

    def connection_opened(self, record: ConnectionRecord, progress: Progress | None = None) -> None:
        self._open(record, progress)

    def connection_closed(
        self,
        record: ConnectionRecord,
        *,
        bytes_sent: int,
        bytes_received: int,
        error: str | None,
        flags: ResponseFlags | None = None,
    ) -> None:
        live = self._live.pop(id(record), None)
        if live is None:  # closed without being opened: count it as both
            live = self._open(record, None, keep=False)
        self._count(live, bytes_sent, bytes_received)
        if flags is None:
            flags = ResponseFlags.NONE if error is None else ResponseFlags.CONNECT
        live.recorder.closed(flags)
        self._complete(live, error, flags)

    def connection_failed(
        self, record: ConnectionRecord, *, error: str, flags: ResponseFlags
    ) -> None:
        live = self._live.pop(id(record), None)
        if live is None:
            live = self._open(record, None, keep=False)
        elif live.progress is not None:
            self._count(live, *live.progress())
        live.recorder.closed(flags)
        self._complete(live, error, flags)

    def connection_rejected(
        self, *, direction: Direction, src: SocketAddr, dst: SocketAddr, error: str
    ) -> None:
        log_connection_failed(
            src_addr=format_authority(*src),
            dst_addr=format_authority(*dst),
            reporter=_reporter(direction),
            error=error,
            logger=self._logger,
        )

    # ------------------------------------------------------------------ scrape side

    def flush(self) -> None:
        """Count the bytes every live connection moved since the last flush; set
        ``istio_tcp_sockets_open`` to the connections open now, per reporter."""
        open_now = dict.fromkeys(Reporter, 0)
        for live in self._live.values():
            open_now[live.recorder.labels.reporter] += 1
            if live.progress is not None:
                self._count(live, *live.progress())
        for reporter, count in open_now.items():
            self._metrics.sockets_open.labels(reporter.value).set(count)

    def live_connections(self) -> list[ConnectionRecord]:
        """The connections opened and not yet closed."""
        return [live.record for live in self._live.values()]

    def dump(self) -> list[dict[str, object]]:
        """Each live connection with its bytes so far and age (for ``/debug/connections``)."""
        now = self._clock()
        out: list[dict[str, object]] = []
        for live in self._live.values():
            toward, back = live.progress() if live.progress is not None else (0, 0)
            record = live.record
            out.append(
                {
                    "direction": record.direction.value,
                    "src": format_authority(*record.src),
                    "dst": format_authority(*(record.dst_addr or record.dst)),
                    "protocol": record.protocol,
                    "srcIdentity": record.src_identity,
                    "dstIdentity": record.dst_identity,
                    "bytesTowardDestination": toward,
                    "bytesBackToSource": back,
                    "ageSeconds": round(now - live.started, 3),
                }
            )
        return sorted(out, key=lambda c: (str(c["direction"]), str(c["src"])))

    # ------------------------------------------------------------------ internals

    def _open(
        self, record: ConnectionRecord, progress: Progress | None, *, keep: bool = True
    ) -> _Live:
        reporter = _reporter(record.direction)
        mtls = record.protocol == "HBONE"
        source = record.src_workload
        if source is None and not record.from_gateway:  # a gateway's address names no client
            source = self._state.workload_by_ip(self._network, record.src[0])
        destination = record.dst_workload
        if reporter is Reporter.SOURCE:
            service = self._outbound_service(record, source)
        else:
            service = self._inbound_service(record, destination)
        labels = ConnectionLabels.build(
            reporter=reporter,
            source=source,
            # Principals are only what TLS proves: our own on the way out, the verified peer's
            # on the way in; plain TCP has none.
            source_identity=record.src_identity if mtls else None,
            destination=destination,
            destination_service=service,
            destination_identity=record.dst_identity if mtls else None,
            security_policy=SecurityPolicy.MUTUAL_TLS if mtls else SecurityPolicy.UNKNOWN,
            derived_source=record.src_baggage,
            derived_destination=record.dst_baggage,
        )
        recorder = self._metrics.recorder(labels)
        recorder.opened()
        context = AccessLogContext.build(
            labels,
            src_addr=format_authority(*record.src),
            dst_addr=format_authority(*(record.dst_addr or record.dst)),
            hbone_addr=record.hbone_addr,
            source=source,
            destination=destination,
            trace_id=record.trace_id,
        )
        if record.dst_baggage is not None and record.dst_baggage.workload_name:
            # Double HBONE: the workload behind the gateway, as its baggage names it.
            context = replace(context, dst_workload=record.dst_baggage.workload_name)
        if not self._errors_only:  # whether it will fail is not known yet
            log_connection_opened(context, logger=self._logger)
        live = _Live(record, recorder, context, progress, self._clock())
        if keep:
            self._live[id(record)] = live
        return live

    def _outbound_service(
        self, record: ConnectionRecord, source: Workload | None
    ) -> Service | None:
        if not record.dst_service:
            return None
        prefer = source.namespace if source is not None else ""
        return self._state.service_by_hostname(record.dst_service, prefer_namespace=prefer)

    def _inbound_service(
        self, record: ConnectionRecord, destination: Workload | None
    ) -> Service | None:
        """ztunnel's guess: among the services the destination backs, the one the client
        named (``forwarded: host=``), else one whose target port is the connection's port.
        Only services the workload backs count, so a client cannot claim just any."""
        if destination is None:
            return None
        current = self._state.workload(destination.uid) or destination
        backed: list[tuple[Service, Mapping[int, int]]] = []
        for key, ports in current.services.items():
            svc = self._state.service(key)
            if svc is not None:
                backed.append((svc, ports))
        if record.dst_service:
            for svc, _ in backed:
                if svc.hostname == record.dst_service:
                    return svc
        port = record.dst[1]
        for svc, workload_ports in backed:
            for service_port, target in svc.ports.items():
                if target == port or workload_ports.get(service_port) == port:
                    return svc
        return None

    def _count(self, live: _Live, toward: int, back: int) -> None:
        """Bring the counters up to these totals (they only grow)."""
        up = toward - live.toward
        down = back - live.back
        recorder = live.recorder
        if up > 0:
            live.toward = toward
            if recorder.labels.reporter is Reporter.SOURCE:
                recorder.add_sent(up)
            else:
                recorder.add_received(up)
        if down > 0:
            live.back = back
            if recorder.labels.reporter is Reporter.SOURCE:
                recorder.add_received(down)
            else:
                recorder.add_sent(down)

    def _complete(self, live: _Live, error: str | None, flags: ResponseFlags) -> None:
        if self._errors_only and error is None and flags is ResponseFlags.NONE:
            return
        log_connection_complete(
            live.log,
            bytes_sent=live.recorder.bytes_sent,
            bytes_recv=live.recorder.bytes_received,
            duration=self._clock() - live.started,
            error=error,
            logger=self._logger,
        )


def _reporter(direction: Direction) -> Reporter:
    return Reporter.SOURCE if direction is Direction.OUTBOUND else Reporter.DESTINATION
