"""Memory of the real ztunnel-py daemon: idle in local mode, then RSS per enrolled pod (root).

* ``idle``: ``ztunnel-py run`` with ``LOCAL_XDS_PATH=examples/localhost.yaml``,
  ``INPOD_ENABLED=false`` and a local CA: the smallest daemon there is.
* one point per pod count N: ``tools/testbed/mesh.py`` with one node of N pods, each enrolled
  through the fake istio-cni agent (N workloads and N service accounts in the local config, so
  N workload certificates), one daemon; RSS once every pod is Up and the daemon has settled.

Each point is a fresh daemon (and testbed); RSS is read from ``/proc/<pid>/status``
(``VmRSS`` = ``RssAnon`` + ``RssFile`` + ``RssShmem``). No traffic: this is the cost of holding
pods, not of carrying their connections (``tools/bench/run.py --setups pods`` measures that).

    sudo python tools/bench/memory.py [--pods 1,10,50,100] [--redirect ebpf|iptables]
                                      [--csv memory.csv] [--svg memory.svg]
                                      [--baseline before.csv]

The plot needs matplotlib (a dev dependency); without it the table and CSV still come out.
"""

from __future__ import annotations

import argparse
import csv
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tools.bench.loads import wait_pods_up  # noqa: E402 (after the path fix for direct runs)
from tools.testbed.mesh import Mesh, MeshOptions  # noqa: E402
from ztunnel_py.testing.daemon import run_daemon  # noqa: E402

EXAMPLE = REPO / "examples/localhost.yaml"
TAG = "perfmem"  # testbed names zttb-perfmem-*
SETTLE_S = 2.0  # let start-up garbage and deferred work finish before reading RSS
STATUS_KEYS = ("VmRSS", "RssAnon", "RssFile", "VmHWM")


@dataclass(frozen=True)
class Point:
    label: str
    pods: int  # enrolled and Up
    kib: dict[str, int]  # STATUS_KEYS -> KiB

    def mib(self, key: str = "VmRSS") -> float:
        return self.kib[key] / 1024


def read_status(pid: int) -> dict[str, int]:
    found: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in STATUS_KEYS:
            found[key] = int(value.split()[0])
    return found


def idle_local(work: Path) -> Point:
    env = {
        "LOCAL_XDS_PATH": str(EXAMPLE),
        "LOCAL_CA_DIR": str(work / "ca"),
        "INPOD_ENABLED": "false",
    }
    with run_daemon(env, log_dir=work / "logs", wait="ready") as daemon:
        time.sleep(SETTLE_S)
        return Point("idle, local mode", 0, read_status(daemon.proc.pid))


def with_pods(count: int, redirect: str, work: Path) -> Point:
    options = MeshOptions(tag=TAG, nodes=1, pods_per_node=count, redirect=redirect, app="none")
    mesh = Mesh(options, work / f"pods-{count}")
    try:
        mesh.up()
        daemon = mesh.daemons["node-0"]
        up = wait_pods_up(daemon, count)
        time.sleep(SETTLE_S)
        return Point(f"{count} pods, {redirect}", up, read_status(daemon.proc.pid))
    finally:
        mesh.down()


def measure(counts: Sequence[int], redirect: str, work: Path) -> list[Point]:
    """The idle local-mode daemon, then one fresh testbed and daemon per pod count."""
    points = [idle_local(work / "idle")]
    for count in counts:
        points.append(with_pods(count, redirect, work))
        print(f"{points[-1].label}: {points[-1].mib():.1f} MiB", file=sys.stderr)
    return points


def table(points: Sequence[Point]) -> list[str]:
    """Markdown: RSS and its parts per point, and MiB per pod against the previous point."""
    rows = [
        "| daemon | pods Up | RSS MiB | anon MiB | file MiB | MiB per added pod |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    previous: Point | None = None
    for p in points:
        per_pod = "-"
        if previous is not None and previous.pods and p.pods > previous.pods:
            per_pod = f"{(p.mib() - previous.mib()) / (p.pods - previous.pods):.3f}"
        rows.append(
            f"| {p.label} | {p.pods} | {p.mib():.1f} | {p.mib('RssAnon'):.1f} "
            f"| {p.mib('RssFile'):.1f} | {per_pod} |"
        )
        if p.pods:
            previous = p
    return rows


def write_csv(points: Sequence[Point], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)  # run.py writes next to a fresh --write file
    with path.open("w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["label", "pods", *(f"{k}_kib" for k in STATUS_KEYS)])
        for p in points:
            out.writerow([p.label, p.pods, *(p.kib.get(k, "") for k in STATUS_KEYS)])


def read_csv(path: Path) -> list[Point]:
    """Points written by ``write_csv`` (an earlier run, e.g. before a change)."""
    with path.open(newline="") as f:
        return [
            Point(
                row["label"],
                int(row["pods"]),
                {k: int(row[f"{k}_kib"]) for k in STATUS_KEYS if row.get(f"{k}_kib")},
            )
            for row in csv.DictReader(f)
        ]


def write_svg(points: Sequence[Point], path: Path, baseline: Sequence[Point] = ()) -> bool:
    """RSS against enrolled pods (and an earlier run's, dashed); ``False`` without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("svg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    curve = [p for p in points if p.pods]
    idle = [p for p in points if not p.pods]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    xs = [p.pods for p in curve]
    ax.plot(xs, [p.mib() for p in curve], marker="o", label="RSS")
    ax.plot(xs, [p.mib("RssAnon") for p in curve], marker=".", label="anonymous (heap)")
    for p in idle:
        ax.axhline(p.mib(), linestyle=":", color="grey", label=f"{p.label}: {p.mib():.1f} MiB")
    before = [p for p in baseline if p.pods]
    if before:
        ax.plot(
            [p.pods for p in before],
            [p.mib() for p in before],
            linestyle="--",
            marker="o",
            color="tab:red",
            label="RSS, baseline run",
        )
    ax.set_xlabel("enrolled pods")
    ax.set_ylabel("daemon RSS, MiB")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, metadata={"Date": None})  # no timestamp: reruns diff cleanly
    plt.close(fig)
    return True


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pods", default="1,10,50,100", help="comma-separated pod counts")
    parser.add_argument("--redirect", default="ebpf", choices=("ebpf", "iptables"))
    parser.add_argument("--csv", type=Path, help="write the points here")
    parser.add_argument("--svg", type=Path, help="plot RSS per pod here (needs matplotlib)")
    parser.add_argument("--baseline", type=Path, help="a CSV of an earlier run to plot alongside")
    args = parser.parse_args(argv)
    counts = [int(n) for n in args.pods.split(",") if n]
    with tempfile.TemporaryDirectory(prefix="ztpy-memory-") as tmp:
        points = measure(counts, args.redirect, Path(tmp))
    print("\n".join(table(points)))
    if args.csv:
        write_csv(points, args.csv)
    baseline = read_csv(args.baseline) if args.baseline else []
    if args.svg and not write_svg(points, args.svg, baseline):
        print("no plot: matplotlib is not installed", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
