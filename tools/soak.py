"""Soak: many concurrent tunnelled connections with churn for a long time, watching resources.

Not run in CI. Runs the outbound and inbound proxies in this process (the proxy harness: two
pods on loopback, real mTLS HBONE) and keeps ``--connections`` client connections alive at
all times: each one exchanges a few echoes, lives a random while, closes, and is replaced.
Every ``--interval`` seconds it samples RSS, open file descriptors, event-loop lag (how late a
100 ms timer fires), the connections alive and the errors so far, and writes them to a CSV
and an SVG plot. After the warm-up (the first fifth of the run) the curves must be flat: the
run fails when RSS grew by more than ``--max-growth-mib`` between the end of the warm-up and
the end.

    python3 -m tools.soak --connections 10000 --duration 1800 --out /tmp/soak

(10,000 connections need ~40,000 file descriptors: the soak raises its own limit to the hard
limit; raise that with ``ulimit -Hn`` if it is lower.)
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import os
import random
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client import CollectorRegistry

from ztunnel_py.state.store import ProxyState
from ztunnel_py.telemetry.metrics import ConnectionMetrics
from ztunnel_py.telemetry.sink import ProxyTelemetry
from ztunnel_py.testing.proxy_harness import Mesh, echo_app, start_mesh

PAGE = os.sysconf("SC_PAGE_SIZE")
MIB = 1024 * 1024


@dataclass
class Sample:
    t: float
    rss_mib: float
    fds: int
    loop_lag_ms: float
    alive: int
    completed: int
    errors: int


@dataclass
class Soak:
    mesh: Mesh
    port: int
    rng: random.Random
    alive: int = 0
    completed: int = 0
    errors: int = 0
    max_lag_s: float = 0.0
    samples: list[Sample] = field(default_factory=list)

    async def connection(self, stop: asyncio.Event) -> None:
        """One slot: connect, echo a few times over a random lifetime, close, repeat."""
        while not stop.is_set():
            self.alive += 1
            try:
                reader, writer = await self.mesh.dial(self.port)
                for _ in range(self.rng.randint(1, 5)):
                    payload = os.urandom(self.rng.randint(16, 4096))
                    writer.write(payload)
                    if await reader.readexactly(len(payload)) != payload:
                        raise ValueError("echo differs")
                    await asyncio.sleep(self.rng.uniform(0.0, 2.0))
                writer.close()
                await writer.wait_closed()
                self.completed += 1
            except (OSError, ValueError, asyncio.IncompleteReadError):
                self.errors += 1
                await asyncio.sleep(0.1)
            finally:
                self.alive -= 1

    async def lag_probe(self, stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        while not stop.is_set():
            before = loop.time()
            await asyncio.sleep(0.1)
            self.max_lag_s = max(self.max_lag_s, loop.time() - before - 0.1)

    def sample(self, start: float) -> Sample:
        with open("/proc/self/statm") as f:
            rss = int(f.read().split()[1]) * PAGE / MIB
        s = Sample(
            t=round(time.monotonic() - start, 1),
            rss_mib=round(rss, 1),
            fds=len(os.listdir("/proc/self/fd")),
            loop_lag_ms=round(self.max_lag_s * 1000, 1),
            alive=self.alive,
            completed=self.completed,
            errors=self.errors,
        )
        self.max_lag_s = 0.0
        self.samples.append(s)
        return s


def svg_plot(samples: list[Sample], path: Path) -> None:
    """One small chart per series (no plotting library needed)."""
    series = ["rss_mib", "fds", "loop_lag_ms", "alive", "errors"]
    w, h, pad = 640, 120, 30
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h * len(series)}">']
    t_max = max(s.t for s in samples) or 1.0
    for i, name in enumerate(series):
        values = [float(getattr(s, name)) for s in samples]
        top = max(values) or 1.0
        y0 = i * h
        points = " ".join(
            f"{pad + (s.t / t_max) * (w - 2 * pad):.1f},"
            f"{y0 + h - pad / 2 - (v / top) * (h - pad):.1f}"
            for s, v in zip(samples, values, strict=True)
        )
        parts.append(f'<text x="4" y="{y0 + 14}" font-size="12">{name} (max {top:g})</text>')
        parts.append(f'<polyline fill="none" stroke="black" points="{points}"/>')
    parts.append("</svg>")
    path.write_text("\n".join(parts))


async def run(args: argparse.Namespace) -> list[Sample]:
    state = ProxyState()
    telemetry = ProxyTelemetry(ConnectionMetrics(CollectorRegistry()), state, network="")
    mesh = await start_mesh(telemetry=telemetry, state=state)
    port = await mesh.serve_app(echo_app)
    soak = Soak(mesh, port, random.Random(args.seed))
    stop = asyncio.Event()
    tasks = [asyncio.create_task(soak.lag_probe(stop))]
    start = time.monotonic()
    for _ in range(args.connections):
        tasks.append(asyncio.create_task(soak.connection(stop)))
        await asyncio.sleep(0)  # ramp up instead of one SYN flood
    try:
        while time.monotonic() - start < args.duration:
            await asyncio.sleep(args.interval)
            s = soak.sample(start)
            print(
                f"t={s.t:>7}s rss={s.rss_mib:>7} MiB fds={s.fds:>6} lag={s.loop_lag_ms:>7} ms"
                f" alive={s.alive:>6} done={s.completed:>8} errors={s.errors}",
                flush=True,
            )
    finally:
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        await mesh.stop()
    return soak.samples


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=10_000)
    parser.add_argument("--duration", type=float, default=1800.0, help="seconds")
    parser.add_argument("--interval", type=float, default=10.0, help="seconds between samples")
    parser.add_argument("--max-growth-mib", type=float, default=20.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", default="/tmp/ztunnel-py-soak")
    args = parser.parse_args(argv)
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    samples = asyncio.run(run(args))
    with (out / "soak.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(Sample.__dataclass_fields__)
        writer.writerows([list(vars(s).values()) for s in samples])
    svg_plot(samples, out / "soak.svg")
    warm = [s for s in samples if s.t >= args.duration / 5]
    growth = warm[-1].rss_mib - warm[0].rss_mib if warm else 0.0
    print(f"RSS after warm-up grew {growth:.1f} MiB; CSV and plot in {out}")
    return 0 if growth <= args.max_growth_mib else 1


if __name__ == "__main__":
    sys.exit(main())
