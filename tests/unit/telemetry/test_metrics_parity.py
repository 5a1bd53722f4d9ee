"""Our metric families and label sets against ztunnel's, kept here as data.

``ZTUNNEL`` is what ztunnel registers (istio/ztunnel ``src/proxy/metrics.rs``,
``src/xds/metrics.rs``, ``src/dns/metrics.rs``, ``src/inpod/metrics.rs``,
``src/metrics/meta.rs``, ``src/metrics/process.rs``, ``src/metrics/tokio_runtime.rs``), as the
Prometheus text parser names the families (counters without ``_total``). ``INTENDED`` lists
every difference on purpose, with the reason (docs/admin.md repeats it). The test builds the
daemon's registry with the same constructors ``App`` uses, records one sample on every
labelled family so its labels show, and fails on any difference not in ``INTENDED`` and on any
entry of ``INTENDED`` that is no longer a difference.
"""

from __future__ import annotations

import ipaddress

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from ztunnel_py.admin.server import new_registry
from ztunnel_py.bpf.metrics import BpfMetrics
from ztunnel_py.dns.telemetry import DnsMetrics, OnDemandDnsMetrics, dns_labels
from ztunnel_py.proxy.revocation import CrlMetrics
from ztunnel_py.redirect.workloads import WorkloadManagerMetrics
from ztunnel_py.state.model import Workload
from ztunnel_py.state.store import ProxyState, UpdateBatch
from ztunnel_py.telemetry.connections import ConnectionRecord, Direction
from ztunnel_py.telemetry.metrics import ConnectionMetrics, ResponseFlags
from ztunnel_py.telemetry.runtime import LoopMonitor
from ztunnel_py.telemetry.sink import ProxyTelemetry
from ztunnel_py.xds.client import TerminationReason, XdsMetrics

TRAFFIC = frozenset(
    {
        "reporter",
        "source_workload",
        "source_canonical_service",
        "source_canonical_revision",
        "source_workload_namespace",
        "source_principal",
        "source_app",
        "source_version",
        "source_cluster",
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
        # LocalityLabels (flattened; ztunnel encodes them once either workload is known)
        "source_region",
        "source_zone",
        "destination_region",
        "destination_zone",
    }
)
DNS = frozenset(
    {
        "request_query_type",
        "request_protocol",
        "source_canonical_service",
        "source_canonical_revision",
    }
)
ON_DEMAND_DNS = frozenset(
    {
        "source_workload",
        "source_canonical_service",
        "source_canonical_revision",
        "source_workload_namespace",
        "source_principal",
        "source_app",
        "source_version",
        "source_cluster",
        "hostname",
    }
)
NONE: frozenset[str] = frozenset()
REPORTER = frozenset({"reporter"})

ZTUNNEL: dict[str, tuple[str, frozenset[str]]] = {
    "istio_tcp_connections_opened": ("counter", TRAFFIC),
    "istio_tcp_connections_closed": ("counter", TRAFFIC),
    "istio_tcp_received_bytes": ("counter", TRAFFIC),
    "istio_tcp_sent_bytes": ("counter", TRAFFIC),
    "istio_tcp_connections_failed": ("counter", TRAFFIC),
    "istio_tcp_sockets_open": ("gauge", REPORTER),
    "istio_on_demand_dns": ("counter", ON_DEMAND_DNS),
    "istio_crl_policy_rejections": ("counter", REPORTER),
    "istio_crl_untracked_connections": ("counter", REPORTER),
    "istio_dns_requests": ("counter", DNS),
    "istio_dns_upstream_requests": ("counter", DNS),
    "istio_dns_upstream_failures": ("counter", DNS),
    "istio_dns_upstream_request_duration_seconds": ("histogram", DNS),
    "istio_xds_connection_terminations": ("counter", frozenset({"reason"})),
    "istio_xds_message": ("counter", frozenset({"url"})),
    "istio_xds_message_bytes": ("counter", frozenset({"url"})),
    "istio_build": ("gauge", frozenset({"component", "tag"})),
    "workload_manager_active_proxy_count": ("gauge", NONE),
    "workload_manager_pending_proxy_count": ("gauge", NONE),
    "workload_manager_proxies_started": ("counter", NONE),
    "workload_manager_proxies_stopped": ("counter", NONE),
    "process_open_fds": ("gauge", NONE),
    "process_max_fds": ("gauge", NONE),
    "tokio_num_workers": ("gauge", NONE),
    "tokio_global_queue_depth": ("gauge", NONE),
    "tokio_num_alive_tasks": ("gauge", NONE),
    "tokio_worker_total_busy_duration_seconds": ("counter", frozenset({"worker"})),
    "tokio_worker_park_count": ("counter", frozenset({"worker"})),
    "tokio_worker_park_unpark_count": ("counter", frozenset({"worker"})),
}

ONE_LOOP = "one asyncio event loop: no work-stealing queue, no worker threads to park"
PROCESS = "prometheus_client's process collector exports these too"

INTENDED: dict[str, str] = {
    "tokio_global_queue_depth": ONE_LOOP,
    "tokio_worker_total_busy_duration_seconds": ONE_LOOP,
    "tokio_worker_park_count": ONE_LOOP,
    "tokio_worker_park_unpark_count": ONE_LOOP,
    "process_cpu_seconds": PROCESS,
    "process_virtual_memory_bytes": PROCESS,
    "process_resident_memory_bytes": PROCESS,
    "process_start_time_seconds": PROCESS,
    "ztunnel_bpf_events": "eBPF redirection's program counters (eBPF mode only)",
    "ztunnel_py_event_loop_lag_seconds": "event-loop lag, the asyncio counterpart of tokio's"
    " busy time",
}


def our_families() -> dict[str, tuple[str, frozenset[str]]]:
    """Every family a daemon can export (istiod mode, eBPF, pods), one sample each."""
    registry = new_registry()
    state = ProxyState()
    pod = Workload(
        uid="u", name="p", namespace="ns", workload_ips=(ipaddress.ip_address("10.0.0.1"),)
    )
    state.apply(UpdateBatch(workloads=(pod,)))
    telemetry = ProxyTelemetry(ConnectionMetrics(registry), state)
    record = ConnectionRecord(
        direction=Direction.INBOUND,
        src=(ipaddress.ip_address("10.0.0.2"), 5000),
        dst=(ipaddress.ip_address("10.0.0.1"), 80),
        dst_workload=pod,
    )
    telemetry.connection_opened(record, lambda: (1, 1))
    telemetry.flush()
    telemetry.connection_failed(record, error="x", flags=ResponseFlags.CONNECT)
    xds = XdsMetrics(registry)
    xds.record_termination(TerminationReason.RECONNECT)
    xds.messages.labels(url="t").inc()
    xds.message_bytes.labels(url="t").inc()
    WorkloadManagerMetrics(registry)
    LoopMonitor(registry).record(0.001)
    BpfMetrics(registry, lambda: {"out_redirected": 1})
    dns = DnsMetrics(registry)
    dns_labels_ = dns_labels("A", "udp", pod)
    dns.requests.labels(*dns_labels_).inc()
    dns.upstream_requests.labels(*dns_labels_).inc()
    dns.upstream_failures.labels(*dns_labels_).inc()
    dns.upstream_duration.labels(*dns_labels_).observe(0.001)
    OnDemandDnsMetrics(registry).count(pod, "ext.example.com")
    crl = CrlMetrics(registry)
    crl.rejections.labels("destination").inc()
    crl.untracked.labels("source").inc()

    out: dict[str, tuple[str, frozenset[str]]] = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        labels = {k for s in family.samples for k in s.labels if k not in {"le", "quantile"}}
        out[family.name] = (family.type, frozenset(labels))
    return out


def test_families_and_label_sets_match_ztunnel_but_for_documented_differences() -> None:
    ours = our_families()
    differences = {}
    for name in ZTUNNEL.keys() | ours.keys():
        if ZTUNNEL.get(name) != ours.get(name):
            differences[name] = (ZTUNNEL.get(name), ours.get(name))
    undocumented = {k: v for k, v in differences.items() if k not in INTENDED}
    assert undocumented == {}, "differences from ztunnel that docs/admin.md does not explain"
    stale = sorted(INTENDED.keys() - differences.keys())
    assert stale == [], "documented as different but now the same: update INTENDED and the docs"
