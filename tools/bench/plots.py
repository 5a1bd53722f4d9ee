"""The benchmark's plots, drawn from one run's results (``tools/bench/run.py --write``).

SVG with text kept as text and no timestamp, so the files are small and a rerun diffs
cleanly. Each function takes results, not files, and returns whether it drew (``False``
when there is nothing to draw); ``write_all`` draws whatever the run measured:

* ``latency-cdf.svg``: the paced shape's latency distribution per setup (percentiles from
  ``paced.c``'s ``cdf`` line, medians over rounds), on a log axis;
* ``cpu-per-1000rps.svg``: proxy vCPU per 1000 req/s, paced shape and node mix;
* ``rss-per-pod.svg``: one daemon's RSS against enrolled pods (``tools/bench/memory.py``'s
  points), against one Envoy sidecar's RSS and half of it (issue 16's target);
* ``saturation-workers.svg``: wrk requests/s by worker processes per daemon, next to the
  Envoy pair's (one point per worker count the run measured).

matplotlib is a dev dependency; without it nothing is drawn and the tables still come out.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tools.bench.loads import CDF_PERCENTILES, Paced
from tools.bench.nodemix import LABELS as MIX_LABELS
from tools.bench.nodemix import SETUPS as MIX_SETUPS
from tools.bench.nodemix import NodeMixResult
from tools.bench.report import (
    DISPLAY,
    LABELS,
    UPSTREAM,
    DataPlaneResult,
    DestinationResult,
    PodsResult,
    WorkersResult,
    median_planes,
)

FILES = {
    "cdf": "latency-cdf.svg",
    "cpu": "cpu-per-1000rps.svg",
    "rss": "rss-per-pod.svg",
    "workers": "saturation-workers.svg",
}
PACED_RATE = 1000  # the paced shape's requests/s (run.py)


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("svg")
    matplotlib.rcParams["svg.fonttype"] = "none"  # text as text: small files
    matplotlib.rcParams["svg.hashsalt"] = "ztunnel-py"  # stable ids: reruns diff cleanly
    import matplotlib.pyplot as plt

    return plt


def _save(plt: Any, fig: Any, path: Path) -> None:
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, metadata={"Date": None})
    plt.close(fig)


def latency_cdf(planes: Mapping[str, DataPlaneResult], path: Path) -> bool:
    curves = {s: r.paced.cdf for s, r in planes.items() if r.paced.cdf}
    plt = _pyplot()
    if not curves or plt is None:
        return False
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    for setup, cdf in curves.items():
        ax.plot(cdf, [q / 100 for q in CDF_PERCENTILES], label=DISPLAY.get(setup, setup))
    ax.set_xscale("log")
    ax.set_xlabel("latency from the scheduled send, us (log)")
    ax.set_ylabel("fraction of requests")
    ax.set_title("paced 1000 req/s, 1 KiB request/response, 4 connections", fontsize="medium")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize="small", loc="lower right")
    _save(plt, fig, path)
    return True


def cpu_per_1000rps(
    planes: Mapping[str, DataPlaneResult], mix: Mapping[str, NodeMixResult], path: Path
) -> bool:
    bars: list[tuple[str, float, str]] = []  # (label, vCPU per 1000 req/s, group)
    for setup in ("envoy", "iptables", "ebpf", UPSTREAM):
        if setup in planes:
            vcpu = planes[setup].cpu_vcpu  # over the paced run, at PACED_RATE req/s
            bars.append((DISPLAY[setup], vcpu * 1000 / PACED_RATE, "pod pair"))
    bars += [(MIX_LABELS[s], mix[s].vcpu_per_1000rps, "node mix") for s in MIX_SETUPS if s in mix]
    plt = _pyplot()
    if not bars or plt is None:
        return False
    fig, ax = plt.subplots(figsize=(7.6, 0.5 * len(bars) + 1.4))
    groups = list(dict.fromkeys(g for _, _, g in bars))
    colors = {g: c for g, c in zip(groups, ("tab:blue", "tab:orange"), strict=False)}
    labels = [f"{label}, {group}" for label, _, group in bars]
    values = [v for _, v, _ in bars]
    ax.barh(labels, values, color=[colors[g] for _, _, g in bars])
    for y, v in enumerate(values):
        ax.text(v, y, f" {v:.3f}", va="center", fontsize="small")
    ax.invert_yaxis()
    ax.set_xlabel("proxy vCPU per 1000 req/s (all proxy processes)")
    ax.set_xlim(right=max(values) * 1.25)
    ax.grid(alpha=0.3, axis="x")
    _save(plt, fig, path)
    return True


def rss_per_pod(
    points: Sequence[tuple[int, float]],
    path: Path,
    *,
    sidecar_mib: float | None = None,
    after_traffic: tuple[int, float] | None = None,
) -> bool:
    """``points``: (enrolled pods, daemon RSS MiB), no traffic; ``after_traffic``: the pods
    benchmark's (pods, RSS) once every pod has made mesh connections."""
    plt = _pyplot()
    if not points or plt is None:
        return False
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    xs = [p for p, _ in points]
    ax.plot(xs, [m for _, m in points], marker="o", label="daemon RSS, pods enrolled, idle")
    if after_traffic is not None:
        ax.plot(*after_traffic, marker="s", linestyle="", color="tab:red",
                label=f"daemon RSS after traffic ({after_traffic[0]} pods)")  # fmt: skip
    if sidecar_mib:
        ax.axhline(sidecar_mib, color="grey", linestyle="--",
                   label=f"one Envoy sidecar: {sidecar_mib:.1f} MiB")  # fmt: skip
        ax.axhline(sidecar_mib / 2, color="grey", linestyle=":",
                   label="half a sidecar (issue 16's target at 100 pods)")  # fmt: skip
    ax.set_xlabel("enrolled pods (one node, one daemon)")
    ax.set_ylabel("RSS, MiB")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    _save(plt, fig, path)
    return True


def saturation_by_workers(planes_by_workers: Sequence[DataPlaneResult], path: Path) -> bool:
    """wrk requests/s against worker processes per daemon, one line per redirect mode; the
    Envoy pair (at its own concurrency) as a reference line."""
    plt = _pyplot()
    ours = [r for r in planes_by_workers if r.setup in ("iptables", "ebpf")]
    if not ours or plt is None:
        return False
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    for setup in ("iptables", "ebpf"):
        pts = sorted((r.workers, r.wrk.rps) for r in ours if r.setup == setup)
        if pts:
            ax.plot([w for w, _ in pts], [v for _, v in pts], marker="o", label=LABELS[setup])
    for r in planes_by_workers:
        if r.setup in ("envoy", "nomesh"):
            style = "--" if r.setup == "envoy" else ":"
            extra = f", --concurrency {r.workers}" if r.setup == "envoy" else ""
            ax.axhline(r.wrk.rps, color="grey", linestyle=style,
                       label=f"{LABELS[r.setup]}{extra}: {r.wrk.rps:.0f}")  # fmt: skip
    counts = sorted({r.workers for r in ours})
    ax.set_xticks(counts)
    ax.set_xlabel("worker processes per daemon")
    ax.set_ylabel("wrk requests/s (16 connections)")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    _save(plt, fig, path)
    return True


def workers_points(
    rounds: Sequence[Sequence[DataPlaneResult | DestinationResult]],
    workers: Sequence[WorkersResult],
) -> list[DataPlaneResult]:
    """The ``workers`` setup's saturation runs as plot points, with this run's Envoy pair and
    no-mesh results as reference lines; without that setup, the data-plane runs (one worker)."""
    planes = median_planes(rounds)
    if not workers:
        return list(planes.values())
    idle = Paced(0, 0.0, 0.0, 0.0, 0.0)
    points = [
        DataPlaneResult(w.redirect, idle, w.wrk, 0.0, w.cpu_vcpu, 0.0, [], workers=w.workers)
        for w in workers
    ]
    return points + [planes[s] for s in ("envoy", "nomesh") if s in planes]


def write_all(
    out_dir: Path,
    rounds: Sequence[Sequence[DataPlaneResult | DestinationResult]],
    mix: Mapping[str, NodeMixResult],
    pods: PodsResult | None,
    memory_points: Sequence[tuple[int, float]] = (),
    planes_by_workers: Sequence[DataPlaneResult] = (),
) -> list[Path]:
    """Every plot the results allow; the paths written."""
    planes = median_planes(rounds)
    written: list[Path] = []

    def keep(drew: bool, name: str) -> None:
        if drew:
            written.append(out_dir / FILES[name])

    keep(latency_cdf(planes, out_dir / FILES["cdf"]), "cdf")
    keep(cpu_per_1000rps(planes, mix, out_dir / FILES["cpu"]), "cpu")
    envoy = planes.get("envoy")
    sidecar = min(envoy.rss_mib) if envoy is not None and envoy.rss_mib else None
    after = (pods.pods, pods.rss_after) if pods is not None else None
    keep(
        rss_per_pod(memory_points, out_dir / FILES["rss"], sidecar_mib=sidecar,
                    after_traffic=after),
        "rss",
    )  # fmt: skip
    by_workers = list(planes_by_workers) or list(planes.values())
    keep(saturation_by_workers(by_workers, out_dir / FILES["workers"]), "workers")
    return written
