"""ztunnel's access log: one line per connection, on the ``access`` target.

A finished connection logs ``connection complete`` (INFO, or ERROR with ``error=...``); a
connection refused before there is enough to say about it logs ``connection failed`` (WARN);
an opening logs ``connection opened`` at DEBUG. Fields keep ztunnel's names and order::

    src.addr src.workload src.namespace src.identity src.cluster
    dst.addr dst.hbone_addr dst.service dst.workload dst.namespace dst.identity dst.cluster
    direction bytes_sent bytes_recv duration error

Missing values are left out (ztunnel's tracing drops ``None`` fields), and the identities only
appear on mTLS connections. As in ztunnel, each line sits in the connection's span,
``inbound{id=<trace id> peer=<addr>}`` or ``outbound{id=<trace id>}``: the trace id is the
incoming ``traceparent``'s (so a request can be followed across the hops) or the one sent.
``bytes_sent``/``bytes_recv`` are from the reporting workload's
point of view, never flipped (unlike the metrics). Records carry the fields in
``extra={"fields": ...}``, which ``telemetry.logging`` renders as ``key=value`` or JSON keys.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from ztunnel_py.state.model import Workload
from ztunnel_py.telemetry.metrics import ConnectionLabels, Reporter

ACCESS_TARGET = "access"
_LOGGER = logging.getLogger(ACCESS_TARGET)


@dataclass(frozen=True, slots=True)
class Span:
    """A tracing span's name and fields, rendered by ``telemetry.logging`` around the line."""

    name: str
    fields: dict[str, str]


def duration_text(seconds: float) -> str:
    """ztunnel's ``duration`` field: whole milliseconds, ``"12ms"``."""
    return f"{int(max(seconds, 0.0) * 1000)}ms"


@dataclass(frozen=True, slots=True, kw_only=True)
class AccessLogContext:
    """What the access log says about one connection, fixed when it opens.

    ``dst_addr`` is the actual next hop (``ip:15008`` when tunnelled), ``hbone_addr`` the
    CONNECT authority. ``src_workload``/``dst_workload`` are pod names, falling back to the
    canonical service when the workload is unknown.
    """

    labels: ConnectionLabels
    src_addr: str
    dst_addr: str
    hbone_addr: str | None = None
    src_workload: str = ""
    dst_workload: str = ""
    trace_id: int | None = None

    @classmethod
    def build(
        cls,
        labels: ConnectionLabels,
        *,
        src_addr: str,
        dst_addr: str,
        hbone_addr: str | None = None,
        source: Workload | None = None,
        destination: Workload | None = None,
        trace_id: int | None = None,
    ) -> AccessLogContext:
        return cls(
            labels=labels,
            src_addr=src_addr,
            dst_addr=dst_addr,
            hbone_addr=hbone_addr,
            src_workload=source.name if source is not None else labels.source_canonical_service,
            dst_workload=(
                destination.name
                if destination is not None
                else labels.destination_canonical_service
            ),
            trace_id=trace_id,
        )

    def span(self) -> Span | None:
        """ztunnel's span around the line: ``inbound`` (``id``, ``peer``) or ``outbound``."""
        if self.trace_id is None:
            return None
        fields: dict[str, str] = {"id": f"{self.trace_id:032x}"}
        if self.labels.reporter is Reporter.DESTINATION:
            fields["peer"] = self.src_addr
        return Span(self.labels.reporter.direction, fields)

    def fields(self) -> dict[str, Any]:
        tl = self.labels
        mtls = tl.mutual_tls
        candidates: tuple[tuple[str, Any], ...] = (
            ("src.addr", self.src_addr),
            ("src.workload", self.src_workload),
            ("src.namespace", tl.source_workload_namespace),
            ("src.identity", tl.source_principal if mtls else ""),
            ("src.cluster", tl.source_cluster),
            ("dst.addr", self.dst_addr),
            ("dst.hbone_addr", self.hbone_addr or ""),
            ("dst.service", tl.destination_service),
            ("dst.workload", self.dst_workload),
            ("dst.namespace", tl.destination_workload_namespace),
            ("dst.identity", tl.destination_principal if mtls else ""),
            ("dst.cluster", tl.destination_cluster),
            ("direction", tl.reporter.direction),
        )
        return {k: v for k, v in candidates if v}


def log_connection_opened(ctx: AccessLogContext, *, logger: logging.Logger = _LOGGER) -> None:
    if logger.isEnabledFor(logging.DEBUG):
        logger.debug("connection opened", extra={"fields": ctx.fields(), "span": ctx.span()})


def log_connection_complete(
    ctx: AccessLogContext,
    *,
    bytes_sent: int,
    bytes_recv: int,
    duration: float,
    error: str | None = None,
    logger: logging.Logger = _LOGGER,
) -> None:
    """The line at completion; ``duration`` in seconds, ``error`` makes it an ERROR line."""
    level = logging.ERROR if error is not None else logging.INFO
    if not logger.isEnabledFor(level):
        return
    fields = ctx.fields()
    fields["bytes_sent"] = bytes_sent
    fields["bytes_recv"] = bytes_recv
    fields["duration"] = duration_text(duration)
    if error is not None:
        fields["error"] = error
    logger.log(level, "connection complete", extra={"fields": fields, "span": ctx.span()})


def log_connection_failed(
    *,
    src_addr: str,
    dst_addr: str,
    reporter: Reporter,
    error: str,
    logger: logging.Logger = _LOGGER,
) -> None:
    """An early reject, before labels and workloads are known."""
    logger.warning(
        "connection failed",
        extra={
            "fields": {
                "src.addr": src_addr,
                "dst.addr": dst_addr,
                "direction": reporter.direction,
                "error": error,
            }
        },
    )
