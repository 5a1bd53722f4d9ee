"""ztunnel's DNS metrics and DNS access log.

Metrics (``src/dns/metrics.rs``), all with the labels ``request_query_type`` (``a``,
``aaaa``...), ``request_protocol`` (``udp``/``tcp``), ``source_canonical_service`` and
``source_canonical_revision`` (``unknown`` when the client is unknown):

- ``istio_dns_requests``: every query the proxy handled;
- ``istio_dns_upstream_requests`` / ``istio_dns_upstream_failures``: queries forwarded
  upstream, and those that got no usable answer (the client got SERVFAIL);
- ``istio_dns_upstream_request_duration_seconds``: how long forwarding took.

The access log is one DEBUG line per query on the ``dns`` target (``RUST_LOG=dns=debug``),
with ztunnel's fields ``src.workload src.namespace query domain result endpoints``.
"""

from __future__ import annotations

import logging

from prometheus_client import CollectorRegistry, Counter, Histogram

from ztunnel_py.state.model import Workload
from ztunnel_py.telemetry.metrics import SOURCE_LABEL_NAMES

DNS_TARGET = "dns"
UNKNOWN = "unknown"
LABEL_NAMES = (
    "request_query_type",
    "request_protocol",
    "source_canonical_service",
    "source_canonical_revision",
)
DURATION_BUCKETS = (0.0005, 0.001, 0.01, 0.1, 1.0, 5.0)

_LOGGER = logging.getLogger(DNS_TARGET)


class DnsMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "istio_dns_requests",
            "Total number of DNS requests (unstable)",
            LABEL_NAMES,
            registry=registry,
        )
        self.upstream_requests = Counter(
            "istio_dns_upstream_requests",
            "Total number of DNS requests forwarded to upstream (unstable)",
            LABEL_NAMES,
            registry=registry,
        )
        self.upstream_failures = Counter(
            "istio_dns_upstream_failures",
            "Total number of DNS requests that failed to forward upstream (unstable)",
            LABEL_NAMES,
            registry=registry,
        )
        self.upstream_duration = Histogram(
            "istio_dns_upstream_request_duration_seconds",
            "Total time in seconds Istio takes to get DNS response from upstream (unstable)",
            LABEL_NAMES,
            buckets=DURATION_BUCKETS,
            registry=registry,
        )


def dns_labels(query_type: str | None, protocol: str, source: Workload | None) -> tuple[str, ...]:
    return (
        query_type.lower() if query_type else UNKNOWN,
        protocol,
        (source.canonical_name if source is not None else "") or UNKNOWN,
        (source.canonical_revision if source is not None else "") or UNKNOWN,
    )


def dns_log_enabled(logger: logging.Logger = _LOGGER) -> bool:
    return logger.isEnabledFor(logging.DEBUG)


def log_dns_request(
    *,
    source: Workload | None,
    query_type: str | None,
    domain: str | None,
    result: str,
    endpoints: int,
    logger: logging.Logger = _LOGGER,
) -> None:
    if not logger.isEnabledFor(logging.DEBUG):
        return
    fields: dict[str, object] = {
        "src.workload": source.name if source is not None else UNKNOWN,
        "src.namespace": source.namespace if source is not None else UNKNOWN,
    }
    if query_type is not None:
        fields["query"] = query_type
    if domain is not None:
        fields["domain"] = domain
    fields["result"] = result
    fields["endpoints"] = endpoints
    logger.debug("", extra={"fields": fields})


# istio_on_demand_dns: the source workload and the hostname looked up.
ON_DEMAND_LABEL_NAMES = (*SOURCE_LABEL_NAMES, "hostname")


class OnDemandDnsMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.lookups = Counter(
            "istio_on_demand_dns",
            "The total number of requests that used on-demand DNS (unstable)",
            ON_DEMAND_LABEL_NAMES,
            registry=registry,
        )

    def count(self, source: Workload, hostname: str) -> None:
        values = (
            source.workload_name,
            source.canonical_name,
            source.canonical_revision,
            source.namespace,
            source.identity,
            source.canonical_name,
            source.canonical_revision,
            source.cluster_id,
            hostname,
        )
        self.lookups.labels(*(v or UNKNOWN for v in values)).inc()
