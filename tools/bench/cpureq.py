"""CPU time per request of the real daemons on the HBONE path, A/B between code trees (root).

The figure that per-request work shows up in is not wall time (the machine is shared) but the
daemons' own CPU time divided by the requests they carried. A two-node testbed mesh
(``tools/testbed/mesh.py``) carries Istio's paced shape (``paced.c``: 1 KiB request/response
over 4 long-lived connections) from pod-0-0 (node-0) to pod-1-0 (node-1); the CPU time of both
daemons over the paced run comes from ``/proc/<pid>/task/*/schedstat`` (nanoseconds, every
thread), so short runs still resolve microseconds.

``--code LABEL=DIR`` (repeatable) runs the daemons from another source tree (its
``ztunnel_py`` package, put first on ``PYTHONPATH``); each round brings up one mesh per tree
and runs their loads at the same time, so an A/B comparison shares the machine's load of the
moment (other work on it moves single runs by 10-20%; the same moment moves both):

    git archive <commit> ztunnel_py | tar -x -C /tmp/base
    sudo python tools/bench/cpureq.py --code before=/tmp/base --code after=. --rounds 3

``--pyspy DIR`` also samples both daemons with py-spy during each paced run (collapsed
stacks, ``--native`` so uvloop's and OpenSSL's C frames show; a paced run of its own after the
measured one, since py-spy stops the process for each sample) and prints where the samples go
by part of the request path (``tools/bench/profile.py``).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from statistics import median

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tools.bench.loads import Paced, ServerApps, build_paced, paced, thread_cpu_ns  # noqa: E402
from tools.bench.profile import Breakdown, breakdown, read_collapsed  # noqa: E402
from tools.testbed.mesh import Mesh, MeshOptions  # noqa: E402

CLIENT, SERVER = "pod-0-0", "pod-1-0"
TAG = "p2cpu"  # testbed names zttb-p2cpu<N>-*, one per code tree


@dataclass(frozen=True)
class Sample:
    code: str
    round: int
    requests: int
    cpu_ns: tuple[int, ...]  # per daemon: node-0 (client side), node-1 (server side)
    p50_us: float
    p99_us: float

    @property
    def us_per_request(self) -> float:
        """Both daemons' CPU per request, microseconds."""
        return sum(self.cpu_ns) / 1000 / max(1, self.requests)

    def us_per_request_of(self, i: int) -> float:
        return self.cpu_ns[i] / 1000 / max(1, self.requests)


def summarize(samples: Sequence[Sample]) -> list[str]:
    """Markdown: per code tree the median CPU per request (both daemons and each), and the
    per-round figures, so the spread between rounds is visible next to the medians."""
    codes = list(dict.fromkeys(s.code for s in samples))
    lines = [
        "| code | rounds | CPU us/request (both daemons) | client daemon | server daemon "
        "| per round | p50 us | p99 us |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for code in codes:
        mine = [s for s in samples if s.code == code]
        per_round = ", ".join(f"{s.us_per_request:.1f}" for s in mine)
        lines.append(
            f"| {code} | {len(mine)} | {median(s.us_per_request for s in mine):.1f} "
            f"| {median(s.us_per_request_of(0) for s in mine):.1f} "
            f"| {median(s.us_per_request_of(1) for s in mine):.1f} | {per_round} "
            f"| {median(s.p50_us for s in mine):.0f} | {median(s.p99_us for s in mine):.0f} |"
        )
    if len(codes) >= 2:
        base = median(s.us_per_request for s in samples if s.code == codes[0])
        for code in codes[1:]:
            other = median(s.us_per_request for s in samples if s.code == code)
            lines.append("")
            lines.append(
                f"{code} / {codes[0]}: {other / base:.3f}x CPU per request ({other - base:+.1f} us)"
            )
    return lines


def parse_code(specs: Sequence[str]) -> list[tuple[str, Path]]:
    """``LABEL=DIR`` pairs; each DIR must hold a ``ztunnel_py`` package."""
    out: list[tuple[str, Path]] = []
    for spec in specs or [f"this tree={REPO}"]:
        label, sep, path = spec.partition("=")
        if not sep or not label or not path:
            raise ValueError(f"--code {spec!r}: use LABEL=DIR")
        root = Path(path).resolve()
        if not (root / "ztunnel_py" / "__init__.py").is_file():
            raise ValueError(f"--code {spec!r}: {root} has no ztunnel_py package")
        out.append((label, root))
    return out


class Runner:
    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        self.args = args
        self.work = work
        self.paced_bin = build_paced(work / "paced")

    def measure_round(self, codes: Sequence[tuple[str, Path]], round_no: int) -> list[Sample]:
        """One mesh per code tree, all up at once; the paced loads run at the same time, so
        every tree meets the same load from the rest of the machine."""
        with contextlib.ExitStack() as stack:
            setups = [
                self._mesh(stack, label, root, f"{TAG}{i}", round_no)
                for i, (label, root) in enumerate(codes)
            ]
            for mesh, _, _ in setups:  # connections, TLS and pools up before measuring
                paced(mesh.bed, self.paced_bin, CLIENT, mesh.plan.pod(SERVER).ip, seconds=1,
                      rate=200)  # fmt: skip
            before = [[thread_cpu_ns(p) for p in pids] for _, pids, _ in setups]
            results = self._paced_everywhere([mesh for mesh, _, _ in setups])
            after = [[thread_cpu_ns(p) for p in pids] for _, pids, _ in setups]
            if self.args.pyspy:
                # A run of its own: py-spy stops the process for each native stack it takes,
                # which would count in the CPU figures above.
                samplers = [
                    proc for _, pids, label in setups for proc in self._pyspy(pids, label, round_no)
                ]
                self._paced_everywhere([mesh for mesh, _, _ in setups])
                for proc in samplers:
                    proc.wait(timeout=60)
            return [
                Sample(
                    code=label,
                    round=round_no,
                    requests=result.count,
                    cpu_ns=tuple(b - a for a, b in zip(b0, b1, strict=True)),
                    p50_us=result.p50,
                    p99_us=result.p99,
                )
                for (_, _, label), result, b0, b1 in zip(
                    setups, results, before, after, strict=True
                )
            ]

    def _mesh(
        self, stack: contextlib.ExitStack, label: str, root: Path, tag: str, round_no: int
    ) -> tuple[Mesh, list[int], str]:
        os.environ["PYTHONPATH"] = str(root)  # the daemons import this tree's ztunnel_py
        work = self.work / f"{label}-{round_no}".replace(" ", "_")
        mesh = Mesh(MeshOptions(tag=tag, redirect=self.args.redirect, app="none"), work)
        stack.callback(mesh.down)
        mesh.up()
        apps = ServerApps(mesh.bed, work, self.paced_bin)
        stack.callback(apps.stop)
        apps.start(SERVER, iperf=False, http=False)
        return mesh, [mesh.daemons[n.name].proc.pid for n in mesh.plan.nodes], label

    def _paced_everywhere(self, meshes: Sequence[Mesh]) -> list[Paced]:
        with ThreadPoolExecutor(len(meshes)) as pool:
            futures = [
                pool.submit(paced, m.bed, self.paced_bin, CLIENT, m.plan.pod(SERVER).ip,
                            seconds=self.args.seconds, rate=self.args.rate)
                for m in meshes
            ]  # fmt: skip
            return [f.result() for f in futures]

    def _pyspy(
        self, pids: Sequence[int], label: str, round_no: int
    ) -> list[subprocess.Popen[bytes]]:
        if not self.args.pyspy:
            return []
        out = Path(self.args.pyspy)
        out.mkdir(parents=True, exist_ok=True)
        procs = []
        for i, pid in enumerate(pids):
            path = out / f"{label}-r{round_no}-node{i}.txt".replace(" ", "_")
            procs.append(
                subprocess.Popen(
                    ["py-spy", "record", "--pid", str(pid), "--format", "raw", "--native",
                     "--rate", "500", "--duration", str(max(1, int(self.args.seconds) - 1)),
                     "--output", str(path)],
                    stdout=subprocess.DEVNULL,
                    stderr=path.with_suffix(".log").open("wb"),
                )
            )  # fmt: skip
        time.sleep(0.5)  # py-spy attaches before the load starts
        return procs


def print_profiles(directory: Path) -> None:
    for path in sorted(directory.glob("*.txt")):
        parts: Breakdown = breakdown(read_collapsed(path))
        print(f"\n{path.name}: {parts.total} samples")
        for name, share in parts.shares():
            print(f"  {name:<40} {share * 100:5.1f}%")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--code", action="append", default=[], help="LABEL=DIR (repeatable)")
    parser.add_argument("--redirect", default="ebpf", choices=("ebpf", "iptables"))
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--rate", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--pyspy", default="", help="directory for py-spy's collapsed stacks")
    args = parser.parse_args(argv)
    try:
        codes = parse_code(args.code)
    except ValueError as e:
        parser.error(str(e))
    if os.geteuid() != 0:
        sys.exit("run as root: the testbed creates namespaces, cgroups and BPF programs")
    samples: list[Sample] = []
    with tempfile.TemporaryDirectory(prefix="ztpy-cpureq-") as tmp:
        runner = Runner(args, Path(tmp))
        for r in range(args.rounds):
            for s in runner.measure_round(codes, r + 1):
                print(
                    f"round {r + 1} {s.code}: {s.requests} requests, "
                    f"{s.us_per_request:.1f} us CPU/request "
                    f"({s.us_per_request_of(0):.1f} + {s.us_per_request_of(1):.1f})",
                    file=sys.stderr,
                    flush=True,
                )
                samples.append(s)
    print("\n".join(summarize(samples)))
    if args.pyspy:
        print_profiles(Path(args.pyspy))
    return 0


if __name__ == "__main__":
    sys.exit(main())
