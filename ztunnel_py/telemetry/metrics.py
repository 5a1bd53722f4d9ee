"""Istio's standard TCP metrics, as ztunnel exports them (``src/proxy/metrics.rs``).

``ConnectionMetrics`` registers the five connection counters on a given registry;
``ConnectionLabels`` is the label set of one connection (Istio's ``CommonTrafficLabels``); a
``ConnectionRecorder`` is the per-connection handle the proxy holds: it resolves the labelled
counters once, so that counting bytes on the hot path is one counter increment.

Byte direction. ``add_sent``/``add_received`` are from the point of view of the workload the
reporter stands for (the client pod for ``reporter=source``, the server pod for
``reporter=destination``), like the access log's ``bytes_sent``/``bytes_recv``. Istio's metrics
are instead fixed to the request direction: ``istio_tcp_received_bytes_total`` counts the
client-to-server bytes and ``istio_tcp_sent_bytes_total`` the server-to-client bytes, for both
reporters. So for ``reporter=source`` the two are flipped against the workload's view:

=====================  =====================================  =====================================
call                   reporter=destination (inbound)         reporter=source (outbound)
=====================  =====================================  =====================================
``add_sent(n)``        ``istio_tcp_sent_bytes_total``         ``istio_tcp_received_bytes_total``
``add_received(n)``    ``istio_tcp_received_bytes_total``     ``istio_tcp_sent_bytes_total``
=====================  =====================================  =====================================

``LABEL_NAMES`` is ztunnel's ``CommonTrafficLabels`` including its locality labels
(``source_region``, ``source_zone``, ``destination_region``, ``destination_zone``). ztunnel
leaves those four out of a series whose source and destination workloads are both unknown;
a Prometheus family here has one label set, so such series carry them as ``unknown``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, replace

from prometheus_client import CollectorRegistry, Counter, Gauge

from ztunnel_py.hbone.headers import Baggage
from ztunnel_py.state.model import Service, Workload

UNKNOWN = "unknown"


class Reporter(enum.Enum):
    SOURCE = "source"  # outbound: this proxy stands for the client
    DESTINATION = "destination"  # inbound: this proxy stands for the server

    @property
    def direction(self) -> str:
        """The access log's ``direction`` field."""
        return "outbound" if self is Reporter.SOURCE else "inbound"


class ResponseFlags(enum.Enum):
    NONE = "-"
    DENY = "DENY"  # an authorization policy denied the connection
    CONNECT = "CONNECT"  # no upstream connection could be established
    TLS_FAILURE = "TLS_FAILURE"
    H2_HANDSHAKE_FAILURE = "H2_HANDSHAKE_FAILURE"
    NETWORK_POLICY = "NETWORK_POLICY"
    IDENTITY_ERROR = "IDENTITY_ERROR"
    CERT_REVOKED = "CERT_REVOKED"


class SecurityPolicy(enum.Enum):
    UNKNOWN = "unknown"
    MUTUAL_TLS = "mutual_tls"


# The source half of ztunnel's labels, also the prefix of its on-demand DNS metric's labels.
SOURCE_LABEL_NAMES: tuple[str, ...] = (
    "source_workload",
    "source_canonical_service",
    "source_canonical_revision",
    "source_workload_namespace",
    "source_principal",
    "source_app",
    "source_version",
    "source_cluster",
)
LABEL_NAMES: tuple[str, ...] = (
    "reporter",
    *SOURCE_LABEL_NAMES,
    "destination_service",
    "destination_service_namespace",
    "destination_service_name",
    "destination_workload",
    "destination_canonical_service",
    "destination_canonical_revision",
    "destination_workload_namespace",
    "destination_principal",
    "destination_app",
    "destination_version",
    "destination_cluster",
    "request_protocol",
    "response_flags",
    "connection_security_policy",
    "source_region",
    "source_zone",
    "destination_region",
    "destination_zone",
)


@dataclass(frozen=True, slots=True, kw_only=True)
class ConnectionLabels:
    """One connection's traffic labels; an empty string is a missing value ("unknown")."""

    reporter: Reporter
    source_workload: str = ""
    source_canonical_service: str = ""
    source_canonical_revision: str = ""
    source_workload_namespace: str = ""
    source_principal: str = ""
    source_app: str = ""
    source_version: str = ""
    source_cluster: str = ""
    destination_service: str = ""
    destination_service_namespace: str = ""
    destination_service_name: str = ""
    destination_workload: str = ""
    destination_canonical_service: str = ""
    destination_canonical_revision: str = ""
    destination_workload_namespace: str = ""
    destination_principal: str = ""
    destination_app: str = ""
    destination_version: str = ""
    destination_cluster: str = ""
    request_protocol: str = "tcp"
    response_flags: ResponseFlags = ResponseFlags.NONE
    connection_security_policy: SecurityPolicy = SecurityPolicy.UNKNOWN
    source_region: str = ""
    source_zone: str = ""
    destination_region: str = ""
    destination_zone: str = ""

    @classmethod
    def build(
        cls,
        *,
        reporter: Reporter,
        source: Workload | None = None,
        source_identity: str | None = None,
        destination: Workload | None = None,
        destination_service: Service | None = None,
        destination_identity: str | None = None,
        security_policy: SecurityPolicy = SecurityPolicy.UNKNOWN,
        response_flags: ResponseFlags = ResponseFlags.NONE,
        derived_source: Baggage | None = None,
        derived_destination: Baggage | None = None,
    ) -> ConnectionLabels:
        """Labels as ztunnel derives them.

        ``source_principal`` comes only from ``source_identity`` (the verified peer certificate),
        never from the source workload's service account. ``destination_principal`` is
        ``destination_identity`` when given (the identity the peer proved), else the
        destination workload's own identity. ``derived_source``/``derived_destination`` are
        the peers' ``baggage`` (ztunnel's ``DerivedWorkload``): the source's is used when the
        source workload is unknown, the destination's over ``destination`` (a double-HBONE
        tunnel's ``destination`` is the east-west gateway, the baggage is the final workload).
        """
        fields: dict[str, str] = {"source_principal": source_identity or ""}
        if source is None and derived_source is not None:
            fields.update(_derived("source", derived_source))
        if source is not None:
            fields.update(
                source_workload=source.workload_name,
                source_canonical_service=source.canonical_name,
                source_canonical_revision=source.canonical_revision,
                source_workload_namespace=source.namespace,
                source_app=source.canonical_name,
                source_version=source.canonical_revision,
                source_cluster=source.cluster_id,
                source_region=source.locality.region,
                source_zone=source.locality.zone,
            )
        if destination is not None:
            fields.update(
                destination_workload=destination.workload_name,
                destination_canonical_service=destination.canonical_name,
                destination_canonical_revision=destination.canonical_revision,
                destination_workload_namespace=destination.namespace,
                destination_principal=destination.identity,
                destination_app=destination.canonical_name,
                destination_version=destination.canonical_revision,
                destination_cluster=destination.cluster_id,
                destination_region=destination.locality.region,
                destination_zone=destination.locality.zone,
            )
        if derived_destination is not None:
            fields.update(_derived("destination", derived_destination))
        if destination_identity:
            fields["destination_principal"] = destination_identity
        if destination_service is not None:
            fields.update(
                destination_service=destination_service.hostname,
                destination_service_name=destination_service.name,
                destination_service_namespace=destination_service.namespace,
            )
        return cls(
            reporter=reporter,
            response_flags=response_flags,
            connection_security_policy=security_policy,
            **fields,
        )

    @property
    def mutual_tls(self) -> bool:
        return self.connection_security_policy is SecurityPolicy.MUTUAL_TLS

    def with_response_flags(self, flags: ResponseFlags) -> ConnectionLabels:
        return replace(self, response_flags=flags)

    def values(self) -> tuple[str, ...]:
        """Label values in ``LABEL_NAMES`` order, missing ones as "unknown"."""
        out: list[str] = []
        for name in LABEL_NAMES:
            value = getattr(self, name)
            if isinstance(value, enum.Enum):
                value = value.value
            out.append(value or UNKNOWN)
        return tuple(out)

    def as_dict(self) -> dict[str, str]:
        return dict(zip(LABEL_NAMES, self.values(), strict=True))


class ConnectionMetrics:
    """The connection counters, registered on ``registry`` (never the global default)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        def counter(name: str, documentation: str) -> Counter:
            # prometheus_client appends "_total" on exposition.
            return Counter(name, documentation, LABEL_NAMES, registry=registry)

        self.opened = counter(
            "istio_tcp_connections_opened", "The total number of TCP connections opened"
        )
        self.closed = counter(
            "istio_tcp_connections_closed", "The total number of TCP connections closed"
        )
        self.received_bytes = counter(
            "istio_tcp_received_bytes",
            "The size of total bytes received during request in case of a TCP connection",
        )
        self.sent_bytes = counter(
            "istio_tcp_sent_bytes",
            "The size of total bytes sent during response in case of a TCP connection",
        )
        self.failed = counter(
            "istio_tcp_connections_failed",
            "The total number of TCP connections that failed to establish (unstable)",
        )
        self.sockets_open = Gauge(
            "istio_tcp_sockets_open",
            "The current number of open TCP sockets (unstable)",
            ["reporter"],
            registry=registry,
        )

    def recorder(self, labels: ConnectionLabels) -> ConnectionRecorder:
        return ConnectionRecorder(self, labels)


class ConnectionRecorder:
    """One connection's metrics: ``opened()``, bytes while it lives, ``closed(flags)`` once.

    Byte counters carry the labels as the connection opened (``response_flags="-"``), as in
    ztunnel; the closed and failed counters carry the final flags.
    """

    __slots__ = (
        "_closed",
        "_metrics",
        "_received",
        "_sent",
        "_values",
        "bytes_received",
        "bytes_sent",
        "labels",
    )

    def __init__(self, metrics: ConnectionMetrics, labels: ConnectionLabels) -> None:
        self._metrics = metrics
        self.labels = labels.with_response_flags(ResponseFlags.NONE)
        values = self._values = self.labels.values()
        request = metrics.received_bytes.labels(*values)  # client -> server
        response = metrics.sent_bytes.labels(*values)  # server -> client
        if labels.reporter is Reporter.SOURCE:
            self._sent, self._received = request, response
        else:
            self._sent, self._received = response, request
        self.bytes_sent = 0  # by the reporter's workload, as the access log shows them
        self.bytes_received = 0
        self._closed = False

    def opened(self) -> None:
        self._metrics.opened.labels(*self._values).inc()

    def add_sent(self, n: int) -> None:
        """``n`` bytes went out of the reporter's workload (see the module table)."""
        self.bytes_sent += n
        self._sent.inc(n)

    def add_received(self, n: int) -> None:
        """``n`` bytes came in to the reporter's workload (see the module table)."""
        self.bytes_received += n
        self._received.inc(n)

    @property
    def is_closed(self) -> bool:
        return self._closed

    def closed(self, response_flags: ResponseFlags = ResponseFlags.NONE) -> None:
        """Count the close (and, with a failure flag, the failure); later calls do nothing."""
        if self._closed:
            return
        self._closed = True
        values = self.labels.with_response_flags(response_flags).values()
        self._metrics.closed.labels(*values).inc()
        if response_flags is not ResponseFlags.NONE:
            self._metrics.failed.labels(*values).inc()


def _derived(side: str, b: Baggage) -> dict[str, str]:
    """ztunnel's ``with_derived_source``/``with_derived_destination``: the labels of one side
    from its baggage (the app label is the workload name there, as ztunnel does)."""
    return {
        f"{side}_workload": b.workload_name or "",
        f"{side}_canonical_service": b.service_name or "",
        f"{side}_canonical_revision": b.revision or "",
        f"{side}_workload_namespace": b.namespace or "",
        f"{side}_app": b.workload_name or "",
        f"{side}_version": b.revision or "",
        f"{side}_cluster": b.cluster_id or "",
        f"{side}_region": b.region or "",
        f"{side}_zone": b.zone or "",
    }
