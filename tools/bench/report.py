"""Results of ``tools/bench/run.py`` as markdown sections for docs/BENCHMARKS.md.

Each section is written between its own BEGIN/END markers, so a partial run (``--setups``)
rewrites only the sections it measured; every section names the run and the command it
comes from.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from statistics import median

from tools.bench.loads import Paced, Wrk
from tools.bench.nodemix import NodeMixResult, median_result
from tools.bench.nodemix import render as render_mix

LABELS = {
    "nomesh": "no mesh",
    "envoy": "Envoy pair",
    "iptables": "ztunnel-py, iptables",
    "ebpf": "ztunnel-py, eBPF",
}
# Upstream ztunnel (run.py --ztunnel-bin): shown beside the others, never needed by a summary.
UPSTREAM = "ztunnel"
DISPLAY = {**LABELS, UPSTREAM: "upstream ztunnel (Rust)"}
MIB_PER_MB = 1e6 / (1 << 20)


@dataclass
class DataPlaneResult:
    """The mesh destination (pod-1-0): paced, wrk and iperf3, with the proxies' cost."""

    setup: str
    paced: Paced
    wrk: Wrk
    bulk_gbps: float
    cpu_vcpu: float  # the proxies (both), during the paced run
    cpu_user: float
    rss_mib: list[float]  # per proxy process, after the runs
    workers: int = 1  # worker processes per daemon (Envoy: its --concurrency)


@dataclass
class SameNodeResult:
    """Client and server pods on one node (eBPF mode), with or without the kernel splice."""

    label: str
    paced: Paced
    bulk_gbps: float
    cpu_vcpu: float  # the one daemon, during the paced run
    spliced: int  # connections the kernel carried
    kernel_bytes: int
    copied_bytes: int  # bytes the proxy moved itself in spliced connections (backpressure)


@dataclass
class DestinationResult:
    """The non-mesh destination (pod-1-1): paced and wrk."""

    setup: str
    paced: Paced
    wrk: Wrk
    cpu_vcpu: float  # the proxies, during the paced run
    opened: int | None  # connections the daemons' proxies opened during paced + wrk


@dataclass
class PodsResult:
    pods: int
    enrolled: int
    redirect: str
    startup_s: float
    rss_idle: float
    rss_after: float
    rss_peak: float
    connected: int  # pods whose exchange with their neighbour got answers
    opened: int  # connections the daemon's proxies opened in all


@dataclass
class WorkersResult:
    """Saturation (wrk against the mesh server) with ``workers`` data-plane processes a node."""

    workers: int
    redirect: str
    wrk: Wrk
    cpu_vcpu: float  # both nodes' daemons and their workers, during wrk
    processes: int  # daemon and worker processes measured


def render_workers(info: RunInfo, results: Sequence[WorkersResult]) -> str:
    """The ``saturation-by-workers`` section: one row per worker count."""
    base = results[0].wrk.rps if results else 0.0
    lines = [
        *info.header(),
        "**Saturation by worker count** (`ZTUNNEL_WORKER_THREADS`; wrk, 16 connections, nginx "
        "in the server pod; proxy CPU is both nodes' daemons and workers during wrk)",
        "",
        row("workers per node", "mode", "requests/s", "vs first row", "p50 ms", "p99 ms",
            "proxy vCPU", "processes"),
        row(*["---"] * 8),
    ]  # fmt: skip
    lines += [
        row(r.workers, r.redirect, f"{r.wrk.rps:.0f}", fmt_ratio(ratio(r.wrk.rps, base)),
            f"{r.wrk.latency_ms.get('50', 0):.2f}", f"{r.wrk.latency_ms.get('99', 0):.2f}",
            f"{r.cpu_vcpu:.2f}", r.processes)
        for r in results
    ]  # fmt: skip
    return "\n".join(lines)


def _version(argv: Sequence[str], pattern: str) -> str:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    except OSError:
        return "absent"
    m = re.search(pattern, proc.stdout + proc.stderr)
    return m.group(1) if m else "unknown"


def _code_version() -> str:
    """The commit measured, and whether the daemon's code differs from it."""
    repo = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "--short", "HEAD"],
            capture_output=True, text=True, check=True,
        ).stdout.strip()  # fmt: skip
        dirty = subprocess.run(
            ["git", "-C", str(repo), "status", "--porcelain", "--", "ztunnel_py", "bpf"],
            capture_output=True, text=True, check=True,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return f"{head}{' with uncommitted changes in ztunnel_py/ or bpf/' if dirty else ''}"


def _cpu_times() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + fields[4]
    return sum(fields) - idle, sum(fields)


def background_load(seconds: float = 1.0) -> float:
    """vCPUs busy over ``seconds`` while this benchmark runs nothing (other users of the box)."""
    busy0, total0 = _cpu_times()
    time.sleep(seconds)
    busy1, total1 = _cpu_times()
    return (busy1 - busy0) / max(1, total1 - total0) * (os.cpu_count() or 1)


@dataclass
class RunInfo:
    when: str
    command: str
    machine: str
    versions: str
    loadavg_start: str
    setups: list[str]
    loadavg_end: str = ""
    background: dict[str, list[float]] = field(default_factory=dict)
    cleanup_problems: list[str] = field(default_factory=list)

    @classmethod
    def collect(cls, args: argparse.Namespace, setups: list[str]) -> RunInfo:
        model = "unknown CPU"
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
        mem_kib = int(Path("/proc/meminfo").read_text().split()[1])
        machine = (
            f"{os.cpu_count()} vCPU ({model}), {mem_kib / (1 << 20):.0f} GiB, "
            f"kernel {os.uname().release}"
        )
        versions = ", ".join(
            [
                f"Python {platform.python_version()}",
                "Envoy "
                + _version(["envoy", "--version"], r"version: \S+?/(\d+\.\d+\.\d+)/")
                + f" (--concurrency {args.envoy_concurrency})",
                "nginx " + _version(["nginx", "-v"], r"nginx/(\S+)"),
                "wrk " + _version(["wrk", "-v"], r"wrk \S*?(\d+\.\d+\.\d+)"),
                "iperf3 " + _version(["iperf3", "-v"], r"iperf (\S+)"),
            ]
        )
        return cls(
            when=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()) + f", code {_code_version()}",
            command=shlex.join(["sudo", "python", "tools/bench/run.py", *sys.argv[1:]]),
            machine=machine,
            versions=versions,
            loadavg_start=" ".join(Path("/proc/loadavg").read_text().split()[:3]),
            setups=setups,
        )

    def finish(self, cleanup_problems: list[str]) -> None:
        self.loadavg_end = " ".join(Path("/proc/loadavg").read_text().split()[:3])
        self.cleanup_problems = list(cleanup_problems)

    def header(self) -> list[str]:
        load = ", ".join(
            f"{k} {'/'.join(f'{v:.2f}' for v in vs)}" for k, vs in self.background.items()
        )
        return [
            f"Run: {self.when}; {self.machine}; {self.versions}.",
            f"Other load on the machine: load average {self.loadavg_start} at the start, "
            f"{self.loadavg_end} at the end; vCPUs busy with other work just before each "
            f"setup: {load or 'not measured'}.",
            "",
            f"Reproduce: `{self.command}`",
            "",
        ]


def row(*cells: object) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def ratio(a: float, b: float) -> float | None:
    return a / b if b else None


def fmt_ratio(r: float | None) -> str:
    return f"{r:.2f}x" if r is not None else "n/a"


def _planes(
    rounds: Sequence[Sequence[DataPlaneResult | DestinationResult]],
) -> list[dict[str, DataPlaneResult]]:
    return [{r.setup: r for r in rs if isinstance(r, DataPlaneResult)} for rs in rounds]


def median_planes(
    rounds: Sequence[Sequence[DataPlaneResult | DestinationResult]],
) -> dict[str, DataPlaneResult]:
    """The mesh-destination results of every round, one median result per setup."""
    planes = _planes(rounds)
    return {s: _median_plane([p[s] for p in planes]) for s in planes[0]} if planes else {}


def median_mix(mixes: Sequence[Sequence[NodeMixResult]]) -> dict[str, NodeMixResult]:
    """The node-mix results of every round, one median result per setup."""
    by_setup: dict[str, list[NodeMixResult]] = {}
    for results in mixes:
        for r in results:
            by_setup.setdefault(r.setup, []).append(r)
    return {s: median_result(rs) for s, rs in by_setup.items()}


def render(
    info: RunInfo,
    rounds: Sequence[Sequence[DataPlaneResult | DestinationResult]],
    pods: PodsResult | None,
    xds: Sequence[str],
    mix: dict[str, NodeMixResult] | None = None,
    mix_rounds: int = 1,
    memory_rows: Sequence[str] = (),
    memory_points: Sequence[tuple[int, float]] = (),
) -> dict[str, str]:
    """The markdown sections; with several rounds, each figure is the median over the rounds."""
    sections: dict[str, str] = {}
    planes = _planes(rounds)
    dests = [{r.setup: r for r in rs if isinstance(r, DestinationResult)} for rs in rounds]
    plane = median_planes(rounds)
    outside = {s: _median_dest([d[s] for d in dests]) for s in dests[0]} if dests else {}
    note = (
        [f"Each figure is the median of {len(rounds)} rounds (setups measured in turn, "
         "each round on fresh testbeds); the per-round ratios are at the end.", ""]
        if len(rounds) > 1 else []
    )  # fmt: skip
    if plane:
        body = info.header() + note + _data_plane(plane)
        if len(rounds) > 1:
            body += _plane_rounds(planes)
        sections["hbone-data-plane"] = "\n".join(body)
    if outside:
        body = info.header() + note + _outside(outside)
        if len(rounds) > 1:
            body += _dest_rounds(dests)
        sections["non-mesh-destination"] = "\n".join(body)
    if pods is not None:
        sections["pods-memory"] = "\n".join(info.header() + _pods(pods, plane.get("envoy")))
    if xds:
        sections["xds-map-sync"] = "\n".join(info.header() + _xds(xds))
    if mix:
        sections["node-mix"] = "\n".join(info.header() + render_mix(mix, mix_rounds))
    if memory_rows:
        sections["memory-curve"] = "\n".join(info.header() + list(memory_rows))
    if set(plane) >= set(LABELS) and {"nomesh", "ebpf"} <= set(outside) and pods and xds:
        sections = {
            "summary": summary(info, plane, outside, pods, xds, mix, memory_points),
            **sections,
        }
    return sections


def _median_paced(ps: Sequence[Paced]) -> Paced:
    cdfs = [p.cdf for p in ps]
    cdf: tuple[float, ...] = ()
    if all(cdfs) and len({len(c) for c in cdfs}) == 1:
        cdf = tuple(median(vs) for vs in zip(*cdfs, strict=True))  # per percentile
    return Paced(
        int(median(p.count for p in ps)),
        median(p.p50 for p in ps),
        median(p.p90 for p in ps),
        median(p.p99 for p in ps),
        median(p.max for p in ps),
        cdf,
    )


def _median_wrk(ws: Sequence[Wrk]) -> Wrk:
    keys = set.intersection(*(set(w.latency_ms) for w in ws))
    return Wrk(median(w.rps for w in ws), {k: median(w.latency_ms[k] for w in ws) for k in keys})


def _median_plane(rs: Sequence[DataPlaneResult]) -> DataPlaneResult:
    return DataPlaneResult(
        setup=rs[0].setup,
        paced=_median_paced([r.paced for r in rs]),
        wrk=_median_wrk([r.wrk for r in rs]),
        bulk_gbps=median(r.bulk_gbps for r in rs),
        cpu_vcpu=median(r.cpu_vcpu for r in rs),
        cpu_user=median(r.cpu_user for r in rs),
        rss_mib=[median(vs) for vs in zip(*(r.rss_mib for r in rs), strict=True)],
        workers=rs[0].workers,
    )


def _median_dest(rs: Sequence[DestinationResult]) -> DestinationResult:
    opened = [r.opened for r in rs if r.opened is not None]
    return DestinationResult(
        setup=rs[0].setup,
        paced=_median_paced([r.paced for r in rs]),
        wrk=_median_wrk([r.wrk for r in rs]),
        cpu_vcpu=median(r.cpu_vcpu for r in rs),
        opened=int(median(opened)) if opened else None,
    )


def _plane_rounds(planes: Sequence[dict[str, DataPlaneResult]]) -> list[str]:
    ours = [s for s in ("iptables", "ebpf") if s in planes[0]]
    if "envoy" not in planes[0] or "nomesh" not in planes[0] or not ours:
        return []
    figures: list[tuple[str, Callable[[dict[str, DataPlaneResult], str], float]]] = [
        ("proxy vCPU", lambda p, s: p[s].cpu_vcpu),
        ("added p99", lambda p, s: _added(p[s], p["nomesh"])[2]),
        ("bulk", lambda p, s: p[s].bulk_gbps),
        ("wrk req/s", lambda p, s: p[s].wrk.rps),
    ]
    head = ["ztunnel-py / Envoy", *(f"round {i + 1}" for i in range(len(planes)))]
    lines = ["", f"**Per round** ({' / '.join(LABELS[s] for s in ours)})", "", row(*head)]
    lines.append(row(*["---"] * len(head)))
    for name, get in figures:
        cells = [name]
        for p in planes:
            theirs = get(p, "envoy")
            cells.append(" / ".join(fmt_ratio(ratio(get(p, s), theirs)) for s in ours))
        lines.append(row(*cells))
    return lines


def _dest_rounds(dests: Sequence[dict[str, DestinationResult]]) -> list[str]:
    ours = [s for s in ("ebpf", "iptables") if s in dests[0]]
    if "nomesh" not in dests[0] or not ours:
        return []
    figures: list[tuple[str, Callable[[DestinationResult], float]]] = [
        ("paced p50", lambda r: r.paced.p50),
        ("paced p90", lambda r: r.paced.p90),
        ("paced p99", lambda r: r.paced.p99),
        ("wrk req/s", lambda r: r.wrk.rps),
    ]
    head = ["/ no mesh", *(f"round {i + 1}" for i in range(len(dests)))]
    lines = ["", f"**Per round** ({' / '.join(LABELS[s] for s in ours)})", "", row(*head)]
    lines.append(row(*["---"] * len(head)))
    for name, get in figures:
        cells = [name]
        for d in dests:
            base = get(d["nomesh"])
            cells.append(" / ".join(fmt_ratio(ratio(get(d[s]), base)) for s in ours))
        lines.append(row(*cells))
    return lines


@dataclass(frozen=True)
class Bar:
    """A target on a ratio: ``at_most`` (ratio <= bound) or at least (ratio >= bound)."""

    bound: float
    at_most: bool

    def __str__(self) -> str:
        return f"{'<=' if self.at_most else '>='} {self.bound:.2f}x"

    def met(self, r: float | None) -> str:
        if r is None:
            return "n/a"
        ok = r <= self.bound if self.at_most else r >= self.bound
        return "yes" if ok else "**no**"


FAMILY_LABELS = {"ipv4": "IPv4", "ipv6": "IPv6 only", "dual": "dual stack (over IPv6)"}


def ip_families(
    info: RunInfo,
    per_family: Mapping[str, Sequence[Sequence[DataPlaneResult | DestinationResult]]],
) -> str:
    """The ``ip-families`` section: the same setups on each testbed family, side by side
    (medians over the rounds); the IPv6 rows beside the IPv4 ones."""
    lines = [
        *info.header(),
        "**The same shapes on the IPv4, IPv6-only and dual-stack testbeds** "
        "(tools/testbed/plan.py; on dual stack the traffic goes to the IPv6 addresses). "
        "Added latency is against the same family's no-mesh run.",
        "",
        row("family", "setup", "p50 us", "p90 us", "p99 us", "added p99 us", "proxy vCPU (pair)",
            "wrk req/s", "iperf3 Gbit/s", "non-mesh p99 us", "non-mesh wrk req/s"),
        row(*["---"] * 11),
    ]  # fmt: skip
    for family, rounds in per_family.items():
        planes = [{r.setup: r for r in rs if isinstance(r, DataPlaneResult)} for rs in rounds]
        dests = [{r.setup: r for r in rs if isinstance(r, DestinationResult)} for rs in rounds]
        plane = {s: _median_plane([p[s] for p in planes]) for s in planes[0]} if planes else {}
        outside = {s: _median_dest([d[s] for d in dests]) for s in dests[0]} if dests else {}
        nm = plane.get("nomesh")
        for s in ("nomesh", "envoy", "iptables", "ebpf"):
            if s not in plane:
                continue
            r, o = plane[s], outside.get(s)
            lines.append(
                row(
                    FAMILY_LABELS.get(family, family),
                    LABELS[s],
                    f"{r.paced.p50:.0f}",
                    f"{r.paced.p90:.0f}",
                    f"{r.paced.p99:.0f}",
                    "-" if s == "nomesh" or nm is None else f"{_added(r, nm)[2]:.0f}",
                    "-" if s == "nomesh" else f"{r.cpu_vcpu:.3f}",
                    f"{r.wrk.rps:.0f}",
                    f"{r.bulk_gbps:.2f}",
                    "-" if o is None else f"{o.paced.p99:.0f}",
                    "-" if o is None else f"{o.wrk.rps:.0f}",
                )
            )
    return "\n".join(lines)


def _data_plane(res: dict[str, DataPlaneResult]) -> list[str]:
    nm = res.get("nomesh")
    order = [s for s in ("nomesh", "envoy", "iptables", "ebpf", UPSTREAM) if s in res]
    lines = [
        "**Istio shape: paced 1000 req/s, 1 KiB request/response, 4 long-lived connections, "
        "pod-0-0 (node-0) to pod-1-0 (node-1)**",
        "",
        row("setup", "requests", "p50 us", "p90 us", "p99 us", "added p50", "added p90",
            "added p99", "proxy vCPU (pair)", "of which user", "proxy RSS MiB (pair)"),
        row(*["---"] * 11),
    ]  # fmt: skip
    for s in order:
        r = res[s]
        p = r.paced
        extra = ["-"] * 6
        if s != "nomesh":
            extra = [
                *(f"{v:.0f}" if nm else "n/a" for v in _added(r, nm)),
                f"{r.cpu_vcpu:.3f}",
                f"{r.cpu_user:.3f}",
                f"{sum(r.rss_mib):.1f}",
            ]
        lines.append(row(DISPLAY[s], p.count, f"{p.p50:.0f}", f"{p.p90:.0f}", f"{p.p99:.0f}",
                         *extra))  # fmt: skip
    lines += [
        "",
        "**Saturation (wrk, 16 connections, nginx) and bulk (iperf3, one stream)**",
        "",
        row("setup", "wrk req/s", "wrk p50 ms", "wrk p90 ms", "wrk p99 ms", "iperf3 Gbit/s"),
        row(*["---"] * 6),
    ]
    for s in order:
        r = res[s]
        lat = [f"{r.wrk.latency_ms.get(p, 0):.2f}" for p in ("50", "90", "99")]
        lines.append(row(DISPLAY[s], f"{r.wrk.rps:.0f}", *lat, f"{r.bulk_gbps:.2f}"))
    ev = res.get("envoy")
    ours = [s for s in ("iptables", "ebpf") if s in res]
    if ev is None or nm is None or not ours:
        return lines
    if UPSTREAM in res:
        lines += _against_upstream(res, ours, nm)
    figures: list[tuple[str, str, Bar | None, Callable[[DataPlaneResult], float]]] = [
        ("proxy vCPU at 1000 req/s", ".3f", Bar(2.0, True), lambda r: r.cpu_vcpu),
        ("added p50 us", ".0f", None, lambda r: _added(r, nm)[0]),
        ("added p90 us", ".0f", None, lambda r: _added(r, nm)[1]),
        ("added p99 us", ".0f", Bar(3.0, True), lambda r: _added(r, nm)[2]),
        ("proxy RSS MiB (pair)", ".1f", None, lambda r: sum(r.rss_mib)),
        ("wrk req/s", ".0f", None, lambda r: r.wrk.rps),
        ("bulk Gbit/s", ".2f", Bar(1 / 3, False), lambda r: r.bulk_gbps),
    ]
    head = ["figure", "Envoy pair"]
    for s in ours:
        head += [LABELS[s], "/ Envoy"]
    if len(ours) == 2:
        head.append("eBPF / iptables")
    head += ["bar (issue 5)", "met"]
    lines += [
        "",
        "**ztunnel-py / Envoy, same run** (issue 5's bars: CPU <= 2x, added p99 <= 3x, "
        "bulk >= 0.33x; DESIGN's goal is parity, 1x)",
        "",
        row(*head),
        row(*["---"] * len(head)),
    ]
    for name, fmt, bar, get in figures:
        theirs = get(ev)
        cells = [name, format(theirs, fmt)]
        mine = {s: get(res[s]) for s in ours}
        for s in ours:
            cells += [format(mine[s], fmt), fmt_ratio(ratio(mine[s], theirs))]
        if len(ours) == 2:
            cells.append(fmt_ratio(ratio(mine["ebpf"], mine["iptables"])))
        if bar is None:
            cells += ["-", "-"]
        else:
            met = [f"{s}: {bar.met(ratio(mine[s], theirs))}" for s in ours]
            cells += [str(bar), ", ".join(met)]
        lines.append(row(*cells))
    return lines


def _against_upstream(
    res: dict[str, DataPlaneResult], ours: Sequence[str], nm: DataPlaneResult
) -> list[str]:
    """Upstream ztunnel against the Envoy pair, and ztunnel-py against upstream ztunnel."""
    up, ev = res[UPSTREAM], res["envoy"]
    figures: list[tuple[str, str, Callable[[DataPlaneResult], float]]] = [
        ("proxy vCPU at 1000 req/s", ".3f", lambda r: r.cpu_vcpu),
        ("added p50 us", ".0f", lambda r: _added(r, nm)[0]),
        ("added p90 us", ".0f", lambda r: _added(r, nm)[1]),
        ("added p99 us", ".0f", lambda r: _added(r, nm)[2]),
        ("proxy RSS MiB (pair)", ".1f", lambda r: sum(r.rss_mib)),
        ("wrk req/s", ".0f", lambda r: r.wrk.rps),
        ("bulk Gbit/s", ".2f", lambda r: r.bulk_gbps),
    ]
    head = ["figure", DISPLAY[UPSTREAM], "/ Envoy", *(f"{LABELS[s]} / upstream" for s in ours)]
    lines = [
        "",
        "**Upstream ztunnel, same run** (the iptables setup's testbed with Istio's Rust ztunnel "
        "as the node daemons)",
        "",
        row(*head),
        row(*["---"] * len(head)),
    ]
    for name, fmt, get in figures:
        theirs = get(up)
        cells = [name, format(theirs, fmt), fmt_ratio(ratio(theirs, get(ev)))]
        cells += [fmt_ratio(ratio(get(res[s]), theirs)) for s in ours]
        lines.append(row(*cells))
    return lines


def _added(r: DataPlaneResult, nm: DataPlaneResult | None) -> tuple[float, float, float]:
    if nm is None:
        return (0.0, 0.0, 0.0)
    return (r.paced.p50 - nm.paced.p50, r.paced.p90 - nm.paced.p90, r.paced.p99 - nm.paced.p99)


def _outside(res: dict[str, DestinationResult]) -> list[str]:
    order = [s for s in ("nomesh", "ebpf", "iptables", UPSTREAM) if s in res]
    lines = [
        "**pod-0-0 (enrolled when a daemon runs) to pod-1-1 (never in the mesh): paced 1000 "
        "req/s of 1 KiB over 4 connections, then wrk (16 connections, nginx)**",
        "",
        row("setup", "requests", "p50 us", "p90 us", "p99 us", "wrk req/s", "wrk p99 ms",
            "proxy vCPU (pair, paced)", "connections the proxies opened"),
        row(*["---"] * 9),
    ]  # fmt: skip
    for s in order:
        r = res[s]
        p = r.paced
        lines.append(
            row(DISPLAY[s], p.count, f"{p.p50:.0f}", f"{p.p90:.0f}", f"{p.p99:.0f}",
                f"{r.wrk.rps:.0f}", f"{r.wrk.latency_ms.get('99', 0):.2f}",
                "-" if s == "nomesh" else f"{r.cpu_vcpu:.3f}",
                "-" if r.opened is None else r.opened)
        )  # fmt: skip
    nm = res.get("nomesh")
    ours = [s for s in ("ebpf", "iptables") if s in res]
    if nm is None or not ours:
        return lines
    latency, throughput = Bar(1.05, True), Bar(0.95, False)
    figures: list[tuple[str, Bar, Callable[[DestinationResult], float]]] = [
        ("paced p50 us", latency, lambda r: r.paced.p50),
        ("paced p90 us", latency, lambda r: r.paced.p90),
        ("paced p99 us", latency, lambda r: r.paced.p99),
        ("wrk req/s", throughput, lambda r: r.wrk.rps),
    ]
    head = ["figure", "no mesh"]
    for s in ours:
        head += [LABELS[s], "/ no mesh"]
    head += ["target (eBPF)", "met"]
    lines += [
        "",
        "**Against no mesh, same run** (target for eBPF mode: within 5%, i.e. latency "
        "<= 1.05x and requests/s >= 0.95x)",
        "",
        row(*head),
        row(*["---"] * len(head)),
    ]
    for name, bar, get in figures:
        base = get(nm)
        cells = [name, f"{base:.0f}"]
        for s in ours:
            cells += [f"{get(res[s]):.0f}", fmt_ratio(ratio(get(res[s]), base))]
        if "ebpf" in res:
            cells += [str(bar), bar.met(ratio(get(res["ebpf"]), base))]
        else:
            cells += ["-", "-"]
        lines.append(row(*cells))
    return lines


def _pods(p: PodsResult, ev: DataPlaneResult | None) -> list[str]:
    lines = [
        f"**One node, {p.pods} pods, one daemon ({p.redirect} mode); every pod then exchanges "
        f"10 requests with its neighbour's echo server through the mesh ({p.pods} identities, "
        f"{p.pods} HBONE pools)**",
        "",
        row("pods enrolled (Up)", "testbed + daemon up to ready, s", "daemon RSS idle, MiB",
            "daemon RSS after traffic, MiB", "daemon peak RSS, MiB", "pods answered",
            "connections proxied"),
        row(*["---"] * 7),
        row(f"{p.enrolled} of {p.pods}", f"{p.startup_s:.1f}", f"{p.rss_idle:.1f}",
            f"{p.rss_after:.1f}", f"{p.rss_peak:.1f}", f"{p.connected} of {p.pods}", p.opened),
    ]  # fmt: skip
    if ev is None or len(ev.rss_mib) != 2:
        lines += ["", "(No Envoy pair in this run: no comparison.)"]
        return lines
    client, server = ev.rss_mib
    sidecar = min(client, server)
    r = ratio(p.rss_after, sidecar)
    lines += [
        "",
        "**Against one Envoy sidecar, same run** (target: one daemon for 100 pods below one "
        "sidecar's RSS; the sidecars are this run's Envoy pair after their paced, wrk and "
        "iperf3 runs, with a static one-cluster config, so a real sidecar holding a mesh's "
        "xDS config is larger)",
        "",
        row("figure", "RSS MiB", "daemon (after traffic) / this", "target", "met"),
        row(*["---"] * 5),
        row("Envoy sidecar, client side", f"{client:.1f}", fmt_ratio(ratio(p.rss_after, client)),
            "-", "-"),
        row("Envoy sidecar, server side", f"{server:.1f}", fmt_ratio(ratio(p.rss_after, server)),
            "-", "-"),
        row(f"the smaller sidecar; daemon for {p.pods} pods / it", f"{sidecar:.1f}", fmt_ratio(r),
            "< 1x", "yes" if r is not None and r < 1 else "**no**"),
    ]  # fmt: skip
    return lines


def _xds_checks(table: Sequence[str]) -> list[tuple[str, float, str, float]]:
    """(mirrored into, sync seconds, which interval that is, peak RSS in MB) per row."""
    out = []
    for line in table[2:]:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        start, since_ports, peak = cells[4], cells[5], float(cells[7])
        if since_ports != "-":
            out.append((cells[3], float(since_ports), "ports open to ready", peak / MIB_PER_MB))
        else:
            out.append((cells[3], float(start), "process start to ready", peak / MIB_PER_MB))
    return out


def _xds(table: Sequence[str]) -> list[str]:
    """bench_xds.py's rows, with the targets checked (2 s to ready, under 150 MB)."""
    lines = [
        "**A fake istiod pushes 10,000 workloads, 1,000 services and 1,000 policies over delta "
        "ADS to a real daemon process (`tools/bench_xds.py`, run twice by this command: state "
        "only, then `--ebpf`, which also mirrors the state into the BPF maps before ready)**",
        "",
        *table,
        "",
        row("mirrored into", "sync time checked, s", "within 2 s", "peak RSS MB",
            "under 150 MB"),
        row(*["---"] * 5),
    ]  # fmt: skip
    for mode, sync, which, peak_mb in _xds_checks(table):
        lines.append(
            row(mode, f"{sync:.2f} ({which})", "yes" if sync <= 2.0 else "**no**",
                f"{peak_mb:.0f}", "yes" if peak_mb < 150 else "**no**")
        )  # fmt: skip
    return lines


def summary(
    info: RunInfo,
    plane: dict[str, DataPlaneResult],
    outside: dict[str, DestinationResult],
    pods: PodsResult | None,
    xds: Sequence[str],
    mix: dict[str, NodeMixResult] | None = None,
    memory_points: Sequence[tuple[int, float]] = (),
) -> str:
    """Every target against this run, one line each (only for a run of every setup)."""
    rows: list[str] = []

    def add(target: str, figure: str, bar: Bar, r: float | None) -> None:
        rows.append(row(target, figure, fmt_ratio(r), str(bar), bar.met(r)))

    ev, nm = plane["envoy"], plane["nomesh"]
    for s in ("iptables", "ebpf"):
        zt = plane[s]
        label = LABELS[s]
        add(
            "issue 5: proxy CPU at 1000 req/s",
            f"{label} / Envoy",
            Bar(2, True),
            ratio(zt.cpu_vcpu, ev.cpu_vcpu),
        )
        add(
            "issue 5: added p99",
            f"{label} / Envoy",
            Bar(3, True),
            ratio(_added(zt, nm)[2], _added(ev, nm)[2]),
        )
        add(
            "issue 5: bulk throughput",
            f"{label} / Envoy",
            Bar(1 / 3, False),
            ratio(zt.bulk_gbps, ev.bulk_gbps),
        )
    for s in ("iptables", "ebpf"):
        zt = plane[s]
        label = LABELS[s]
        add(
            "DESIGN: proxy CPU at 1000 req/s at or below Envoy's",
            f"{label} / Envoy",
            Bar(1, True),
            ratio(zt.cpu_vcpu, ev.cpu_vcpu),
        )
        for i, pct in enumerate(("p50", "p90", "p99")):
            add(
                f"DESIGN: added {pct} at or below Envoy's",
                f"{label} / Envoy",
                Bar(1, True),
                ratio(_added(zt, nm)[i], _added(ev, nm)[i]),
            )
        add(
            "DESIGN: bulk at least half of Envoy's",
            f"{label} / Envoy",
            Bar(0.5, False),
            ratio(zt.bulk_gbps, ev.bulk_gbps),
        )
    eb, base = outside["ebpf"], outside["nomesh"]
    for name, mine, theirs, bar in (
        (
            "eBPF issue: non-mesh destination, paced p50",
            eb.paced.p50,
            base.paced.p50,
            Bar(1.05, True),
        ),
        (
            "eBPF issue: non-mesh destination, paced p90",
            eb.paced.p90,
            base.paced.p90,
            Bar(1.05, True),
        ),
        (
            "eBPF issue: non-mesh destination, paced p99",
            eb.paced.p99,
            base.paced.p99,
            Bar(1.05, True),
        ),
        ("eBPF issue: non-mesh destination, wrk req/s", eb.wrk.rps, base.wrk.rps, Bar(0.95, False)),
    ):
        add(name, "eBPF / no mesh", bar, ratio(mine, theirs))
    if pods is not None and len(ev.rss_mib) == 2:
        add(
            f"DESIGN: one daemon for {pods.pods} pods below one Envoy sidecar's RSS",
            "daemon after traffic / smaller sidecar",
            Bar(1, True),
            ratio(pods.rss_after, min(ev.rss_mib)),
        )
    rows += issue16_rows(plane, pods, mix or {}, memory_points)
    for mode, sync, which, peak_mb in _xds_checks(xds):
        rows.append(
            row(f"DESIGN: 10,000 workloads, 1,000 services, 1,000 policies applied ({mode})",
                which, f"{sync:.2f} s", "<= 2 s", "yes" if sync <= 2 else "**no**")
        )  # fmt: skip
        rows.append(
            row(f"daemon under 150 MB with 10,000 workloads ({mode})", "peak RSS",
                f"{peak_mb:.0f} MB", "< 150 MB", "yes" if peak_mb < 150 else "**no**")
        )  # fmt: skip
    body = [
        *info.header(),
        row("target", "figure", "measured", "bar", "met"),
        row(*["---"] * 5),
        *rows,
    ]  # fmt: skip
    return "\n".join(body)


def issue16_rows(
    plane: dict[str, DataPlaneResult],
    pods: PodsResult | None,
    mix: dict[str, NodeMixResult],
    memory_points: Sequence[tuple[int, float]],
) -> list[str]:
    """Issue 16's targets: ratios to the Envoy pair (CPU, added p90/p99, saturation, bulk),
    memory (idle local mode; 100 pods against half a sidecar), the node mix."""
    rows: list[str] = []
    ev, nm = plane.get("envoy"), plane.get("nomesh")
    if ev is None or nm is None:
        return rows

    def add(target: str, figure: str, bar: Bar, r: float | None) -> None:
        rows.append(row(f"issue 16: {target}", figure, fmt_ratio(r), str(bar), bar.met(r)))

    for s, cpu_bar in (("ebpf", 0.8), ("iptables", 1.0)):
        if s not in plane:
            continue
        zt, label = plane[s], f"{LABELS[s]} / Envoy"
        add("proxy CPU at 1000 req/s", label, Bar(cpu_bar, True), ratio(zt.cpu_vcpu, ev.cpu_vcpu))
        for i, pct in ((1, "p90"), (2, "p99")):
            add(f"added {pct}", label, Bar(1.0, True), ratio(_added(zt, nm)[i], _added(ev, nm)[i]))
        add("saturation (wrk req/s)", label, Bar(1.2, False), ratio(zt.wrk.rps, ev.wrk.rps))
        add("bulk, one stream", label, Bar(1.5, False), ratio(zt.bulk_gbps, ev.bulk_gbps))
    sidecar = min(ev.rss_mib) if ev.rss_mib else 0.0
    hundred = [mib for n, mib in memory_points if n == 100]
    if sidecar and hundred:
        add("100 pods (idle) under half a sidecar", "daemon / one sidecar", Bar(0.5, True),
            ratio(hundred[0], sidecar))  # fmt: skip
    if sidecar and pods is not None:
        add(f"{pods.pods} pods (after traffic) under half a sidecar", "daemon / one sidecar",
            Bar(0.5, True), ratio(pods.rss_after, sidecar))  # fmt: skip
    ebpf = mix.get("nodemix-ebpf")
    for other, bar in (("nodemix-envoy", 0.5), ("nodemix-iptables", 1.0)):
        theirs = mix.get(other)
        if ebpf is not None and theirs is not None:
            add("node mix, total proxy CPU", f"eBPF / {other.split('-', 1)[1]}",
                Bar(bar, True), ratio(ebpf.cpu_s, theirs.cpu_s))  # fmt: skip
    return rows


def same_node(info: RunInfo, results: Sequence[SameNodeResult]) -> str:
    body = [
        *info.header(),
        row("same node", "paced p50 µs", "p90 µs", "p99 µs", "daemon CPU (vCPU)",
            "bulk Gbit/s", "spliced conns", "kernel MiB", "proxy-copied MiB"),
        row(*["---"] * 9),
    ]  # fmt: skip
    body += [
        row(
            r.label,
            f"{r.paced.p50:.0f}",
            f"{r.paced.p90:.0f}",
            f"{r.paced.p99:.0f}",
            f"{r.cpu_vcpu:.3f}",
            f"{r.bulk_gbps:.2f}",
            r.spliced,
            f"{r.kernel_bytes / 2**20:.1f}",
            f"{r.copied_bytes / 2**20:.1f}",
        )
        for r in results
    ]
    return "\n".join(body)


def write_sections(path: Path, sections: dict[str, str]) -> None:
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    for name, body in sections.items():
        begin = f"<!-- BEGIN {name} benchmark (tools/bench/run.py) -->"
        end = f"<!-- END {name} benchmark -->"
        block = f"{begin}\n{body}\n{end}"
        if begin in text and end in text:
            head, rest = text.split(begin, 1)
            text = head + block + rest.split(end, 1)[1]
        else:
            text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(text)
