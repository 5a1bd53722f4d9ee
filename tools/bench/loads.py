"""Load generators and process meters for the benchmark, run inside testbed pods (root).

Every load generator runs through ``Testbed.run``: inside the client pod's netns AND its cgroup,
which eBPF redirection needs (the connect hooks sit on the node's cgroup) and which costs the
other setups nothing. Servers start the same way with ``Testbed.popen``.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tools.testbed.bed import Testbed
from ztunnel_py.testing.daemon import Daemon

REPO = Path(__file__).resolve().parents[2]
PACED_SOURCE = REPO / "tools/bench/paced.c"
ECHO_PORT, HTTP_PORT, IPERF_PORT = 7000, 8080, 5201
APP_PORTS = (ECHO_PORT, HTTP_PORT, IPERF_PORT)
CLK_TCK = os.sysconf("SC_CLK_TCK")


# The percentiles of paced.c's ``cdf`` line: 0..99 by 1, then 99.5, 99.9 and 100.
CDF_PERCENTILES = (*(float(q) for q in range(100)), 99.5, 99.9, 100.0)


@dataclass(frozen=True)
class Paced:
    count: int
    p50: float  # microseconds, from the scheduled send time
    p90: float
    p99: float
    max: float
    cdf: tuple[float, ...] = ()  # latency at each of CDF_PERCENTILES, when asked for


def parse_paced(out: str) -> Paced:
    """paced.c's output: ``count p50 p90 p99 max``, then with ``cdf`` a line of percentiles."""
    lines = out.strip().splitlines()
    if not lines:
        raise RuntimeError("paced printed nothing")
    count, p50, p90, p99, worst = lines[0].split()
    cdf: tuple[float, ...] = ()
    if len(lines) > 1:
        cdf = tuple(float(v) for v in lines[1].split())
        if len(cdf) != len(CDF_PERCENTILES):
            raise RuntimeError(
                f"paced's cdf line has {len(cdf)} values, not {len(CDF_PERCENTILES)}"
            )
    return Paced(int(count), float(p50), float(p90), float(p99), float(worst), cdf)


@dataclass(frozen=True)
class Wrk:
    rps: float
    latency_ms: dict[str, float] = field(default_factory=dict)  # "50" / "90" / "99"


@dataclass
class CpuMeter:
    """utime+stime of a set of processes over a stretch of wall time."""

    pids: Sequence[int]
    _start: dict[int, tuple[int, int]] = field(default_factory=dict)
    _t0: float = 0.0
    vcpu: float = 0.0
    user: float = 0.0

    def start(self) -> None:
        self._start = {pid: cpu_ticks(pid) for pid in self.pids}
        self._t0 = time.monotonic()

    def stop(self) -> None:
        wall = time.monotonic() - self._t0
        end = {pid: cpu_ticks(pid) for pid in self.pids}
        user = sum(end[p][0] - self._start[p][0] for p in self.pids)
        system = sum(end[p][1] - self._start[p][1] for p in self.pids)
        self.user = user / CLK_TCK / wall
        self.vcpu = (user + system) / CLK_TCK / wall


def url_host(ip: str) -> str:
    """An address as a URL or nginx ``listen`` host: IPv6 in brackets."""
    return f"[{ip}]" if ":" in ip else ip


def cpu_ticks(pid: int) -> tuple[int, int]:
    """(utime, stime) of the whole process (all threads), in clock ticks."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]), int(fields[12])


def thread_cpu_ns(pid: int) -> int:
    """CPU time of every thread of ``pid`` so far, in nanoseconds (schedstat's first field):
    finer than ``cpu_ticks``, so runs of a few seconds still resolve microseconds a request."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            total += int((task / "schedstat").read_text().split()[0])
        except (OSError, IndexError, ValueError):
            continue  # a thread that exited meanwhile
    return total


def rss_mib(pid: int, key: str = "VmRSS") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/{pid}/status has no {key}")


def wait_pods_up(daemon: Daemon, count: int, timeout: float = 120) -> int:
    """Wait until ``count`` pods are Up in the daemon's workload state (or timeout); how many."""
    deadline = time.monotonic() + timeout
    while True:
        states = daemon.config_dump().get("workloadState", {})
        up = sum(1 for s in states.values() if s.get("state") == "Up")
        if up >= count or time.monotonic() > deadline:
            return up
        time.sleep(0.5)


def build_paced(out: Path) -> Path:
    subprocess.run(
        ["cc", "-O2", "-pthread", "-o", str(out), str(PACED_SOURCE)],
        check=True,
        capture_output=True,
    )
    return out


def run_in_pod(bed: Testbed, pod: str, argv: Sequence[str], timeout: float = 300) -> str:
    proc = bed.run(pod, argv, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(
            f"{' '.join(argv)} in {pod} exited with {proc.returncode}: {proc.stderr.strip()[-800:]}"
        )
    return proc.stdout


def paced(
    bed: Testbed,
    paced_bin: Path,
    pod: str,
    host: str,
    *,
    seconds: float,
    rate: int = 1000,
    conns: int = 4,
    size: int = 1024,
    cdf: bool = False,
) -> Paced:
    out = run_in_pod(
        bed,
        pod,
        [str(paced_bin), "client", host, str(ECHO_PORT), str(conns), str(rate), str(seconds),
         str(size), *(["cdf"] if cdf else [])],
    )  # fmt: skip
    return parse_paced(out)


def wrk(bed: Testbed, pod: str, host: str, *, seconds: int, conns: int = 16) -> Wrk:
    out = run_in_pod(
        bed,
        pod,
        [
            "wrk",
            "-t2",
            f"-c{conns}",
            f"-d{seconds}s",
            "--latency",
            f"http://{url_host(host)}:{HTTP_PORT}/",
        ],
    )
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if m is None:
        raise RuntimeError(f"wrk printed no Requests/sec: {out[-500:]}")
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)|Socket errors: .*", out)
    if errors:
        raise RuntimeError(f"wrk saw errors against {host}: {errors.group(0)}")
    latency: dict[str, float] = {}
    for pct in ("50", "90", "99"):
        p = re.search(rf"^\s+{pct}%\s+([\d.]+)(us|ms|s)\b", out, re.M)
        if p:
            latency[pct] = float(p.group(1)) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[p.group(2)]
    return Wrk(float(m.group(1)), latency)


def bulk_gbps(bed: Testbed, pod: str, host: str, *, seconds: int) -> float:
    out = run_in_pod(
        bed, pod, ["iperf3", "-c", host, "-p", str(IPERF_PORT), "-t", str(seconds), "-J"]
    )
    report: dict[str, Any] = json.loads(out)
    return float(report["end"]["sum_received"]["bits_per_second"]) / 1e9


class ServerApps:
    """The applications of a server pod: the paced echo server, nginx-light, iperf3."""

    def __init__(self, bed: Testbed, work: Path, paced_bin: Path) -> None:
        self.bed = bed
        self.work = work
        self.paced_bin = paced_bin
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, pod: str, *, iperf: bool = True, http: bool = True) -> None:
        ip = self.bed.plan.pod(pod).ip
        logs = self.work / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        self._spawn(pod, "paced", [str(self.paced_bin), "server", ip, str(ECHO_PORT)])
        if http:
            self._spawn(pod, "nginx", ["nginx", "-c", str(self._nginx_conf(pod, ip))])
        if iperf:
            self._spawn(pod, "iperf3", ["iperf3", "-s", "-B", ip, "-p", str(IPERF_PORT)])
        ports = [ECHO_PORT] + ([HTTP_PORT] if http else []) + ([IPERF_PORT] if iperf else [])
        for port in ports:
            self._wait_listening(pod, ip, port)

    def start_echo(self, pod: str) -> None:
        ip = self.bed.plan.pod(pod).ip
        self._spawn(pod, "paced", [str(self.paced_bin), "server", ip, str(ECHO_PORT)])

    def wait_echo(self, pod: str) -> None:
        self._wait_listening(pod, self.bed.plan.pod(pod).ip, ECHO_PORT)

    def _spawn(self, pod: str, name: str, argv: list[str]) -> None:
        with open(self.work / "logs" / f"{pod}-{name}.log", "wb") as log:
            self.procs.append(
                self.bed.popen(pod, argv, stdout=log, stderr=subprocess.STDOUT, stdin=None)
            )

    def _nginx_conf(self, pod: str, ip: str) -> Path:
        root = self.work / "nginx" / pod
        (root / "tmp").mkdir(parents=True, exist_ok=True)
        conf = root / "nginx.conf"
        conf.write_text(
            "daemon off;\nworker_processes 1;\nuser root;\n"
            f"pid {root}/nginx.pid;\nerror_log {root}/error.log error;\n"
            "events { worker_connections 1024; }\n"
            "http {\n  access_log off;\n"
            f"  client_body_temp_path {root}/tmp/body;\n  proxy_temp_path {root}/tmp/proxy;\n"
            f"  fastcgi_temp_path {root}/tmp/fcgi;\n  uwsgi_temp_path {root}/tmp/uwsgi;\n"
            f"  scgi_temp_path {root}/tmp/scgi;\n"
            f"  server {{ listen {url_host(ip)}:{HTTP_PORT}; "
            "location / { return 200 'hello'; } }\n"
            "}\n"
        )
        return conf

    def _wait_listening(self, pod: str, ip: str, port: int) -> None:
        # Asked of the socket table, not by connecting: a connection from a mesh pod would
        # itself be captured by the proxy.
        netns = self.bed.plan.pod(pod).netns
        deadline = time.monotonic() + 20
        while True:
            out = subprocess.run(
                ["ip", "netns", "exec", netns, "ss", "-Hltn", f"sport = :{port}"],
                capture_output=True,
                text=True,
                check=False,
            ).stdout
            if out.strip():
                return
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"nothing listens on {ip}:{port} in {pod}; see {self.work / 'logs'}"
                )
            time.sleep(0.05)

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.procs.clear()
