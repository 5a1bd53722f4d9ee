"""``BpfMetrics``: the BPF programs' counters as Prometheus metrics, read at scrape time.

The programs count into a per-CPU array; nothing is copied in between, so a scrape always
shows the kernel's current totals. One counter family, ``ztunnel_bpf_events_total``, labelled
by ``event`` (``out_redirected``, ``out_passthrough``, ``in_dropped_deny``, ...). ztunnel has
no eBPF metrics to copy names from, so these carry no ``istio_`` prefix.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping

from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from ztunnel_py.errors import ZtunnelError

log = logging.getLogger(__name__)

METRIC_NAME = "ztunnel_bpf_events"


class BpfMetrics(Collector):
    def __init__(
        self, registry: CollectorRegistry, read_counters: Callable[[], Mapping[str, int]]
    ) -> None:
        self._read = read_counters
        registry.register(self)

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(
            METRIC_NAME,
            "Decisions of the eBPF redirection programs, by event",
            labels=["event"],
        )
        try:
            counters = self._read()
        except (ZtunnelError, OSError) as e:
            log.warning("cannot read the BPF counters: %s", e)
            counters = {}
        for event, value in sorted(counters.items()):
            family.add_metric([event], value)
        yield family

    def describe(self) -> Iterator[Metric]:
        # Registering must not read the kernel map.
        yield CounterMetricFamily(
            METRIC_NAME, "Decisions of the eBPF redirection programs", labels=["event"]
        )
