"""The node-mix benchmark: what a node's proxying costs when most traffic needs no proxy.

Per client pod, half of the connections (and of the requests) go to destinations outside the
mesh, a quarter to a mesh pod on the same node, a quarter to a mesh pod on the other node.
Two nodes, three pods each: ``pod-N-0`` is a client (in the mesh), ``pod-N-1`` a mesh server,
``pod-N-2`` a server outside the mesh (not in the config, never enrolled, no in-pod rules).
Each client runs the paced echo load (``paced.c``, 1 KiB request/response) to every
destination of its plan at once; the figure is the total CPU of every proxy process over the
run (both daemons, or every sidecar), next to each destination class's latency.

Setups (``tools/bench/run.py --setups nodemix``):

* ``nodemix-envoy``: Envoy sidecars as Istio places them: one in each mesh pod. A client
  sidecar captures everything its pod sends (iptables ``REDIRECT``): mesh destinations go over
  HBONE (HTTP/2 CONNECT + mTLS) to the destination's sidecar, everything else is passed
  through as plain TCP (``ORIGINAL_DST``), as Istio's ``PassthroughCluster`` does; a server
  sidecar terminates HBONE in front of its pod's application.
* ``nodemix-iptables``: ztunnel-py with istio-cni's in-pod rules: the daemon captures everything
  (outside destinations through its passthrough).
* ``nodemix-ebpf``: ztunnel-py with eBPF redirection: connections to destinations outside the
  mesh are never redirected.

The plan (``plan_flows``) and the result arithmetic are pure and unit-tested; the runner needs
root and the testbed.
"""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from statistics import median
from typing import Any

from tools.bench.loads import ECHO_PORT, Paced, parse_paced

PODS_PER_NODE = 3
CLIENT_INDEX, SERVER_INDEX, OUTSIDE_INDEX = 0, 1, 2
# Destination classes and their share of each client's connections and requests.
MIX: dict[str, Fraction] = {
    "outside": Fraction(1, 2),
    "same-node": Fraction(1, 4),
    "cross-node": Fraction(1, 4),
}
KINDS = tuple(MIX)
SETUPS = ("nodemix-envoy", "nodemix-iptables", "nodemix-ebpf")
LABELS = {
    "nodemix-envoy": "Envoy sidecars",
    "nodemix-iptables": "ztunnel-py, iptables (captures everything)",
    "nodemix-ebpf": "ztunnel-py, eBPF",
}


def pod_name(node: int, index: int) -> str:
    return f"pod-{node}-{index}"


@dataclass(frozen=True)
class Flow:
    """One paced load: ``conns`` connections from ``client`` to ``dest`` at ``rate`` req/s."""

    client: str
    dest: str
    kind: str  # one of KINDS
    conns: int
    rate: float


def plan_flows(
    *, nodes: int = 2, conns_per_client: int = 8, rate_per_client: float = 500
) -> list[Flow]:
    """Every client's flows: its connections and requests split by ``MIX``.

    Outside destinations alternate between the client's own node and the next one, so that
    non-mesh traffic crosses nodes as often as not. ``conns_per_client`` must split into whole
    connections (a multiple of 4).
    """
    if nodes < 2:
        raise ValueError("nodes must be at least 2: a quarter of the traffic crosses nodes")
    if conns_per_client <= 0 or conns_per_client % 4:
        raise ValueError(f"conns_per_client={conns_per_client}: use a positive multiple of 4")
    if rate_per_client <= 0:
        raise ValueError(f"rate_per_client={rate_per_client}: must be positive")
    flows: list[Flow] = []
    for node in range(nodes):
        client = pod_name(node, CLIENT_INDEX)
        other = (node + 1) % nodes
        outside_conns = int(conns_per_client * MIX["outside"])
        outside_here = outside_conns // 2
        outside_rate = rate_per_client * float(MIX["outside"])
        for dest_node, conns in ((node, outside_here), (other, outside_conns - outside_here)):
            if conns:
                flows.append(
                    Flow(client, pod_name(dest_node, OUTSIDE_INDEX), "outside", conns,
                         outside_rate * conns / outside_conns)
                )  # fmt: skip
        for kind, dest_node in (("same-node", node), ("cross-node", other)):
            flows.append(
                Flow(client, pod_name(dest_node, SERVER_INDEX), kind,
                     int(conns_per_client * MIX[kind]), rate_per_client * float(MIX[kind]))
            )  # fmt: skip
    return flows


def mesh_servers(nodes: int) -> list[str]:
    return [pod_name(n, SERVER_INDEX) for n in range(nodes)]


def outside_pods(nodes: int) -> list[str]:
    return [pod_name(n, OUTSIDE_INDEX) for n in range(nodes)]


def clients(nodes: int) -> list[str]:
    return [pod_name(n, CLIENT_INDEX) for n in range(nodes)]


@dataclass
class NodeMixResult:
    setup: str  # one of SETUPS
    seconds: float
    cpu_s: float  # CPU seconds of every proxy process over the run
    proxies: int  # how many proxy processes
    latency: dict[str, Paced] = field(default_factory=dict)  # kind -> merged figures
    requests: dict[str, int] = field(default_factory=dict)  # kind -> requests answered

    @property
    def total_requests(self) -> int:
        return sum(self.requests.values())

    @property
    def vcpu(self) -> float:
        return self.cpu_s / self.seconds if self.seconds else 0.0

    @property
    def vcpu_per_1000rps(self) -> float:
        rps = self.total_requests / self.seconds if self.seconds else 0.0
        return self.vcpu / rps * 1000 if rps else 0.0

    @property
    def cpu_us_per_request(self) -> float:
        return self.cpu_s * 1e6 / self.total_requests if self.total_requests else 0.0


def merge(setup: str, seconds: float, cpu_s: float, proxies: int,
          runs: Sequence[tuple[Flow, Paced]]) -> NodeMixResult:  # fmt: skip
    """One result from the paced runs of every flow: requests summed per destination class,
    percentiles the request-weighted median of the flows' (each flow's run is one sample)."""
    result = NodeMixResult(setup, seconds, cpu_s, proxies)
    for kind in KINDS:
        mine = [p for f, p in runs if f.kind == kind]
        if not mine:
            continue
        result.requests[kind] = sum(p.count for p in mine)
        weights = [p.count for p in mine]
        result.latency[kind] = Paced(
            result.requests[kind],
            _weighted_median([p.p50 for p in mine], weights),
            _weighted_median([p.p90 for p in mine], weights),
            _weighted_median([p.p99 for p in mine], weights),
            max(p.max for p in mine),
        )
    return result


def _weighted_median(values: Sequence[float], weights: Sequence[int]) -> float:
    pairs = sorted(zip(values, weights, strict=True))
    half = sum(weights) / 2
    seen = 0
    for value, weight in pairs:
        seen += weight
        if seen >= half:
            return value
    return pairs[-1][0] if pairs else 0.0


def median_result(results: Sequence[NodeMixResult]) -> NodeMixResult:
    """Median over rounds of one setup (CPU, requests and each percentile on their own)."""
    first = results[0]
    out = NodeMixResult(
        first.setup,
        median(r.seconds for r in results),
        median(r.cpu_s for r in results),
        first.proxies,
    )
    for kind in first.latency:
        ps = [r.latency[kind] for r in results if kind in r.latency]
        out.requests[kind] = int(median(r.requests.get(kind, 0) for r in results))
        out.latency[kind] = Paced(
            out.requests[kind],
            median(p.p50 for p in ps),
            median(p.p90 for p in ps),
            median(p.p99 for p in ps),
            median(p.max for p in ps),
        )
    return out


def render(results: dict[str, NodeMixResult], rounds: int) -> list[str]:
    """Markdown tables: the proxies' CPU per setup, latency per destination class, the ratios
    issue 16 sets targets on."""
    order = [s for s in SETUPS if s in results]
    if not order:
        return []
    any_result = results[order[0]]
    total_rate = any_result.total_requests / any_result.seconds if any_result.seconds else 0
    lines = [
        f"**Node mix: 2 nodes, per client pod half of the connections to pods outside the mesh, "
        f"a quarter to a mesh pod on the same node, a quarter across nodes; paced 1 KiB "
        f"request/response, about {total_rate:.0f} req/s in all"
        + (f"; medians of {rounds} rounds" if rounds > 1 else "")
        + "**",
        "",
        "| setup | proxy processes | proxy vCPU (all) | vCPU per 1000 req/s | CPU us per request "
        "| " + " | ".join(f"{k} p50 / p99 us" for k in KINDS) + " |",
        "| --- | --- | --- | --- | --- | " + " | ".join("---" for _ in KINDS) + " |",
    ]
    for s in order:
        r = results[s]
        lat = [
            f"{r.latency[k].p50:.0f} / {r.latency[k].p99:.0f}" if k in r.latency else "-"
            for k in KINDS
        ]
        lines.append(
            f"| {LABELS[s]} | {r.proxies} | {r.vcpu:.3f} | {r.vcpu_per_1000rps:.3f} "
            f"| {r.cpu_us_per_request:.1f} | " + " | ".join(lat) + " |"
        )
    ebpf = results.get("nodemix-ebpf")
    if ebpf is None:
        return lines
    lines += ["", "| target (issue 16) | measured | bar | met |", "| --- | --- | --- | --- |"]
    for other, bar in (("nodemix-envoy", 0.5), ("nodemix-iptables", 1.0)):
        theirs = results.get(other)
        if theirs is None or not theirs.cpu_s:
            continue
        share = ebpf.cpu_s / theirs.cpu_s
        met = "yes" if share < bar else "**no**"
        lines.append(
            f"| proxy CPU, ztunnel-py eBPF / {LABELS[other]} | {share:.2f}x | < {bar:.2f}x "
            f"| {met} |"
        )
    return lines


# ---------------------------------------------------------------------------- Envoy sidecars


def envoy_client_config(
    *,
    mesh_servers: dict[str, str],  # server pod IP -> its SPIFFE identity
    hbone_port: int,
    outbound_port: int,
    certs: Any,  # ztunnel_py.testing.envoy.CertFiles
    admin_port: int,
    mark: int,
) -> dict[str, Any]:
    """A client sidecar: mesh destinations over HBONE to their sidecar, the rest passed
    through as plain TCP to where it was going (marked so the capture lets it out)."""
    from ztunnel_py.testing.envoy import (
        TYPE_PREFIX,
        admin_address,
        h2_windows,
        static_cluster,
        tls_context,
    )

    clusters: list[dict[str, Any]] = []
    chains: list[dict[str, Any]] = []
    for i, (ip, identity) in enumerate(sorted(mesh_servers.items())):
        name = f"hbone{i}"
        cluster = static_cluster(name, ip, hbone_port)
        cluster["typed_extension_protocol_options"] = {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": TYPE_PREFIX + "extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": h2_windows()},
            }
        }
        cluster["transport_socket"] = {
            "name": "envoy.transport_sockets.tls",
            "typed_config": {
                "@type": TYPE_PREFIX + "extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                "common_tls_context": tls_context(certs, [identity]),
            },
        }
        clusters.append(cluster)
        chains.append(
            {
                "filter_chain_match": {"prefix_ranges": [{"address_prefix": ip, "prefix_len": 32}]},
                "filters": [_tcp_proxy(TYPE_PREFIX, name, f"hbone_out{i}", tunnel=True)],
            }
        )
    clusters.append(
        {
            "name": "passthrough",
            "connect_timeout": "5s",
            "type": "ORIGINAL_DST",
            "lb_policy": "CLUSTER_PROVIDED",
            "upstream_bind_config": {
                "source_address": {"address": "0.0.0.0", "port_value": 0},
                "socket_options": [
                    # SOL_SOCKET / SO_MARK: the capture rule leaves marked connections alone.
                    {"level": 1, "name": 36, "int_value": mark, "state": "STATE_PREBIND"}
                ],
            },
        }
    )
    listener = {
        "name": "outbound",
        "address": {"socket_address": {"address": "0.0.0.0", "port_value": outbound_port}},
        "listener_filters": [
            {
                "name": "envoy.filters.listener.original_dst",
                "typed_config": {
                    "@type": TYPE_PREFIX + "extensions.filters.listener.original_dst.v3.OriginalDst"
                },
            }
        ],
        "filter_chains": chains,
        "default_filter_chain": {
            "filters": [_tcp_proxy(TYPE_PREFIX, "passthrough", "passthrough", tunnel=False)]
        },
    }
    return {
        "admin": admin_address(admin_port),
        "static_resources": {"listeners": [listener], "clusters": clusters},
    }


def _tcp_proxy(type_prefix: str, cluster: str, stat: str, *, tunnel: bool) -> dict[str, Any]:
    config: dict[str, Any] = {
        "@type": type_prefix + "extensions.filters.network.tcp_proxy.v3.TcpProxy",
        "stat_prefix": stat,
        "cluster": cluster,
    }
    if tunnel:
        config["tunneling_config"] = {"hostname": "%DOWNSTREAM_LOCAL_ADDRESS%"}
    return {"name": "envoy.filters.network.tcp_proxy", "typed_config": config}


def paced_argv(paced_bin: Path, host: str, flow: Flow, seconds: float) -> list[str]:
    return [str(paced_bin), "client", host, str(ECHO_PORT), str(flow.conns), f"{flow.rate:g}",
            f"{seconds:g}", "1024"]  # fmt: skip


def run_flows(
    bed: Any, paced_bin: Path, flows: Sequence[Flow], seconds: float
) -> list[tuple[Flow, Paced]]:
    """Start every flow's paced client at once (inside its pod), wait for all of them."""
    procs = [
        (f, bed.popen(f.client, paced_argv(paced_bin, bed.plan.pod(f.dest).ip, f, seconds),
                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        for f in flows
    ]  # fmt: skip
    out: list[tuple[Flow, Paced]] = []
    for flow, proc in procs:
        stdout, stderr = proc.communicate(timeout=seconds + 120)
        if proc.returncode != 0:
            raise RuntimeError(
                f"paced {flow.client} -> {flow.dest} exited {proc.returncode}: {stderr[-500:]}"
            )
        out.append((flow, parse_paced(stdout)))
    return out
