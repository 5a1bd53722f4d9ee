"""HBONE data-plane benchmark: no mesh vs an Envoy HBONE pair vs a ztunnel-py pair (root).

Topology (one machine): two pods as network namespaces on one veth link. The server pod runs
the apps (a paced echo server, nginx-light, iperf3); the client pod runs the load generators.

* ``nomesh``: the client talks to the server pod directly.
* ``envoy``: a client-side Envoy in the client pod (iptables REDIRECT to :15001, original_dst,
  tcp_proxy tunneling over HTTP/2 + mTLS to the server pod's :15008) and a server-side Envoy in
  the server pod terminating CONNECT (mTLS, SPIFFE SANs checked both ways).
* ``ztpy``: two ztunnel-py node processes (``ztpy_node.py``), each serving one pod with its
  listeners inside that pod's netns, as in-pod mode does; same iptables REDIRECT in the client.

Shapes: Istio's (paced 1000 req/s of 1 KiB request/response over 4 long-lived connections:
proxy CPU and added latency), saturation (wrk, 16 connections, nginx), bulk (iperf3, one
stream). Results go to stdout and into this benchmark's section of docs/BENCHMARKS.md.

    sudo python tools/bench/run.py [--seconds 20] [--profile] [--write docs/BENCHMARKS.md]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from ztunnel_py.testing.netns import Netns, NetnsPool  # noqa: E402
from ztunnel_py.testing.pki import CertificateAuthority  # noqa: E402

CLIENT_IP, SERVER_IP = "10.232.0.1", "10.232.0.2"
ECHO_PORT, HTTP_PORT, IPERF_PORT = 7000, 8080, 5201
CLIENT_ID = "spiffe://cluster.local/ns/default/sa/client"
SERVER_ID = "spiffe://cluster.local/ns/default/sa/server"
SECTION_BEGIN = "<!-- BEGIN hbone-data-plane benchmark (tools/bench/run.py) -->"
SECTION_END = "<!-- END hbone-data-plane benchmark -->"
CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass
class Result:
    mode: str
    paced: tuple[float, float, float, float] = (0, 0, 0, 0)  # count, p50, p90, p99 (us)
    cpu_vcpu: float = 0.0  # proxies, during the paced run
    cpu_user: float = 0.0  # of which user space
    rss_mib: float = 0.0  # proxies, after the runs
    wrk_rps: float = 0.0
    wrk_lat: dict[str, float] = field(default_factory=dict)  # 50/90/99 in ms
    bulk_gbps: float = 0.0


# ----------------------------------------------------------------------------- helpers

_T = "type.googleapis.com/envoy."  # prefix of every typed_config @type


def sh(*argv: str, netns: Netns | None = None, timeout: float = 120) -> str:
    full = ["ip", "netns", "exec", netns.name, *argv] if netns else list(argv)
    proc = subprocess.run(full, capture_output=True, text=True, timeout=timeout, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(full)} failed: {proc.stderr.strip()[-500:]}")
    return proc.stdout


def popen(
    argv: list[str], netns: Netns | None = None, log: Path | None = None
) -> subprocess.Popen[bytes]:
    full = ["ip", "netns", "exec", netns.name, *argv] if netns else argv
    out = open(log, "wb") if log else subprocess.DEVNULL  # noqa: SIM115 (lives with the process)
    return subprocess.Popen(full, stdout=out, stderr=subprocess.STDOUT)


def cpu_ticks(pid: int) -> tuple[int, int]:
    """(utime, stime) of the whole process, in clock ticks."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]), int(fields[12])


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def real_pid(proc: subprocess.Popen[bytes]) -> int:
    """``ip netns exec`` execs the command, so the pid is the command's own."""
    return proc.pid


def wait_port(netns: Netns, host: str, port: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        probe = subprocess.run(
            ["ip", "netns", "exec", netns.name, "bash", "-c", f"exec 3<>/dev/tcp/{host}/{port}"],
            capture_output=True,
            check=False,
        )
        if probe.returncode == 0:
            return
        time.sleep(0.2)
    raise RuntimeError(f"nothing listens on {host}:{port} in {netns.name}")


def redirect_rules(netns: Netns) -> None:
    netns.sh(
        "iptables",
        "-t",
        "nat",
        "-A",
        "OUTPUT",
        "-p",
        "tcp",
        "!",
        "-d",
        "127.0.0.0/8",
        "!",
        "--dport",
        "15008",
        "-m",
        "mark",
        "!",
        "--mark",
        "0x539/0xfff",
        "-j",
        "REDIRECT",
        "--to-ports",
        "15001",
    )


def flush_rules(netns: Netns) -> None:
    netns.sh("iptables", "-t", "nat", "-F", "OUTPUT")


# ----------------------------------------------------------------------------- Envoy pair


def tls_context(cert: Path, key: Path, root: Path, peer_san: str) -> dict[str, Any]:
    return {
        "tls_params": {
            "tls_minimum_protocol_version": "TLSv1_3",
            "tls_maximum_protocol_version": "TLSv1_3",
        },
        "alpn_protocols": ["h2"],
        "tls_certificates": [
            {"certificate_chain": {"filename": str(cert)}, "private_key": {"filename": str(key)}}
        ],
        "validation_context": {
            "trusted_ca": {"filename": str(root)},
            "match_typed_subject_alt_names": [{"san_type": "URI", "matcher": {"exact": peer_san}}],
        },
    }


def h2_options() -> dict[str, Any]:
    return {"initial_stream_window_size": 4 << 20, "initial_connection_window_size": 16 << 20}


def cluster(name: str, host: str, port: int) -> dict[str, Any]:
    return {
        "name": name,
        "connect_timeout": "5s",
        "type": "STATIC",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [
                {
                    "lb_endpoints": [
                        {
                            "endpoint": {
                                "address": {"socket_address": {"address": host, "port_value": port}}
                            }
                        }
                    ]
                }
            ],
        },
    }


def envoy_client_config(pki: Path, admin: int) -> dict[str, Any]:
    hbone = cluster("hbone", SERVER_IP, 15008)
    hbone["typed_extension_protocol_options"] = {
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": _T + "extensions.upstreams.http.v3.HttpProtocolOptions",
            "explicit_http_config": {"http2_protocol_options": h2_options()},
        }
    }
    hbone["transport_socket"] = {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": _T + "extensions.transport_sockets.tls.v3.UpstreamTlsContext",
            "common_tls_context": tls_context(
                pki / "client.pem", pki / "client-key.pem", pki / "root.pem", SERVER_ID
            ),
        },
    }
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin}}},
        "static_resources": {
            "listeners": [
                {
                    "name": "outbound",
                    "address": {"socket_address": {"address": "0.0.0.0", "port_value": 15001}},
                    "listener_filters": [
                        {
                            "name": "envoy.filters.listener.original_dst",
                            "typed_config": {
                                "@type": _T
                                + "extensions.filters.listener.original_dst.v3.OriginalDst"
                            },
                        }
                    ],
                    "filter_chains": [
                        {
                            "filters": [
                                {
                                    "name": "envoy.filters.network.tcp_proxy",
                                    "typed_config": {
                                        "@type": _T
                                        + "extensions.filters.network.tcp_proxy.v3.TcpProxy",
                                        "stat_prefix": "hbone_out",
                                        "cluster": "hbone",
                                        "tunneling_config": {
                                            "hostname": "%DOWNSTREAM_LOCAL_ADDRESS%"
                                        },
                                    },
                                }
                            ]
                        }
                    ],
                }
            ],
            "clusters": [hbone],
        },
    }


def envoy_server_config(pki: Path, admin: int) -> dict[str, Any]:
    ports = (ECHO_PORT, HTTP_PORT, IPERF_PORT)
    hcm = {
        "@type": _T + "extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "hbone_in",
        "codec_type": "HTTP2",
        "http2_protocol_options": {**h2_options(), "allow_connect": True},
        "upgrade_configs": [{"upgrade_type": "CONNECT"}],
        "route_config": {
            "name": "local",
            "virtual_hosts": [
                {
                    "name": f"app{p}",
                    "domains": [f"{SERVER_IP}:{p}"],
                    "routes": [
                        {
                            "match": {"connect_matcher": {}},
                            "route": {
                                "cluster": f"app{p}",
                                "upgrade_configs": [
                                    {"upgrade_type": "CONNECT", "connect_config": {}}
                                ],
                            },
                        }
                    ],
                }
                for p in ports
            ],
        },
        "http_filters": [
            {
                "name": "envoy.filters.http.router",
                "typed_config": {"@type": _T + "extensions.filters.http.router.v3.Router"},
            }
        ],
    }
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin}}},
        "static_resources": {
            "listeners": [
                {
                    "name": "hbone",
                    "address": {"socket_address": {"address": "0.0.0.0", "port_value": 15008}},
                    "filter_chains": [
                        {
                            "transport_socket": {
                                "name": "envoy.transport_sockets.tls",
                                "typed_config": {
                                    "@type": _T
                                    + "extensions.transport_sockets.tls.v3.DownstreamTlsContext",
                                    "require_client_certificate": True,
                                    "common_tls_context": tls_context(
                                        pki / "server.pem",
                                        pki / "server-key.pem",
                                        pki / "root.pem",
                                        CLIENT_ID,
                                    ),
                                },
                            },
                            "filters": [
                                {
                                    "name": "envoy.filters.network.http_connection_manager",
                                    "typed_config": hcm,
                                }
                            ],
                        }
                    ],
                }
            ],
            "clusters": [cluster(f"app{p}", SERVER_IP, p) for p in ports],
        },
    }


# ----------------------------------------------------------------------------- the bench


class Bench:
    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        self.args = args
        self.work = work
        self.pki = work / "pki"
        self.paced = work / "paced"
        self.procs: list[subprocess.Popen[bytes]] = []

    def build(self) -> None:
        sh("cc", "-O2", "-pthread", "-o", str(self.paced), str(REPO / "tools/bench/paced.c"))
        ca = CertificateAuthority.create()
        for name, spiffe in (("client", CLIENT_ID), ("server", SERVER_ID)):
            ca.issue_workload(spiffe).write(self.pki, name)
        (self.pki / "root.pem").write_bytes(ca.root_pem)

    def start_apps(self, server: Netns) -> None:
        self.procs.append(popen([str(self.paced), "server", SERVER_IP, str(ECHO_PORT)], server))
        nginx_conf = self.work / "nginx.conf"
        nginx_conf.write_text(
            f"worker_processes 1; daemon off; pid {self.work}/nginx.pid; error_log stderr error;\n"
            "events { worker_connections 1024; }\n"
            f"http {{ access_log off; server {{ listen {SERVER_IP}:{HTTP_PORT};"
            " location / { return 200 'hello'; } } }\n"
        )
        self.procs.append(popen(["nginx", "-c", str(nginx_conf)], server, self.work / "nginx.log"))
        self.procs.append(popen(["iperf3", "-s", "-B", SERVER_IP, "-p", str(IPERF_PORT)], server))
        for port in (ECHO_PORT, HTTP_PORT, IPERF_PORT):
            wait_port(server, SERVER_IP, port)

    @contextlib.contextmanager
    def mesh(self, mode: str, client: Netns, server: Netns) -> Iterator[list[int]]:
        started: list[subprocess.Popen[bytes]] = []
        try:
            if mode == "envoy":
                redirect_rules(client)
                for name, ns, cfg in (
                    ("envoy-client", client, envoy_client_config(self.pki, 15900)),
                    ("envoy-server", server, envoy_server_config(self.pki, 15901)),
                ):
                    path = self.work / f"{name}.yaml"
                    path.write_text(yaml.safe_dump(cfg))
                    started.append(
                        popen(
                            [
                                "envoy",
                                "-c",
                                str(path),
                                "--use-dynamic-base-id",
                                "--concurrency",
                                str(self.args.envoy_concurrency),
                                "-l",
                                "error",
                            ],
                            ns,
                            self.work / f"{name}.log",
                        )
                    )
                wait_port(client, "127.0.0.1", 15001)
                wait_port(server, SERVER_IP, 15008)
            elif mode == "ztpy":
                redirect_rules(client)
                for ns, ip, sa, peer_ip, peer_sa in (
                    (client, CLIENT_IP, "client", SERVER_IP, "server"),
                    (server, SERVER_IP, "server", CLIENT_IP, "client"),
                ):
                    ready = self.work / f"ztpy-{sa}.ready"
                    ready.unlink(missing_ok=True)
                    started.append(
                        popen(
                            [
                                sys.executable,
                                str(REPO / "tools/bench/ztpy_node.py"),
                                "--netns",
                                ns.name,
                                "--ip",
                                ip,
                                "--sa",
                                sa,
                                "--peer-ip",
                                peer_ip,
                                "--peer-sa",
                                peer_sa,
                                "--pki",
                                str(self.pki),
                                "--ready",
                                str(ready),
                            ],
                            None,
                            self.work / f"ztpy-{sa}.log",
                        )
                    )
                    deadline = time.monotonic() + 20
                    while not ready.exists():
                        if time.monotonic() > deadline or started[-1].poll() is not None:
                            log = (self.work / f"ztpy-{sa}.log").read_text()[-2000:]
                            raise RuntimeError(f"ztpy node did not start: {log}")
                        time.sleep(0.1)
            time.sleep(0.5)
            yield [real_pid(p) for p in started]
        finally:
            for p in started:
                p.terminate()
            for p in started:
                try:
                    p.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
            if mode != "nomesh":
                flush_rules(client)

    def run_mode(self, mode: str, client: Netns, server: Netns) -> Result:
        result = Result(mode)
        with self.mesh(mode, client, server) as pids:
            # warm-up: connections, TLS, pools
            sh(
                str(self.paced),
                "client",
                SERVER_IP,
                str(ECHO_PORT),
                "4",
                "200",
                "1",
                "1024",
                netns=client,
            )
            before = {pid: cpu_ticks(pid) for pid in pids}
            t0 = time.monotonic()
            out = sh(
                str(self.paced),
                "client",
                SERVER_IP,
                str(ECHO_PORT),
                "4",
                "1000",
                str(self.args.seconds),
                "1024",
                netns=client,
            )
            wall = time.monotonic() - t0
            after = {pid: cpu_ticks(pid) for pid in pids}
            user = sum(after[p][0] - before[p][0] for p in pids)
            ticks = user + sum(after[p][1] - before[p][1] for p in pids)
            result.cpu_user = user / CLK_TCK / wall
            count, p50, p90, p99, _max = (float(x) for x in out.split())
            result.paced = (count, p50, p90, p99)
            result.cpu_vcpu = ticks / CLK_TCK / wall
            wrk = sh(
                "wrk",
                "-t2",
                "-c16",
                f"-d{self.args.wrk_seconds}s",
                "--latency",
                f"http://{SERVER_IP}:{HTTP_PORT}/",
                netns=client,
            )
            result.wrk_rps = float(re.search(r"Requests/sec:\s+([\d.]+)", wrk).group(1))  # type: ignore[union-attr]
            for pct in ("50", "90", "99"):
                m = re.search(rf"^\s+{pct}%\s+([\d.]+)(us|ms|s)", wrk, re.M)
                if m:
                    scale = {"us": 1e-3, "ms": 1.0, "s": 1e3}[m.group(2)]
                    result.wrk_lat[pct] = float(m.group(1)) * scale
            iperf = json.loads(
                sh(
                    "iperf3",
                    "-c",
                    SERVER_IP,
                    "-p",
                    str(IPERF_PORT),
                    "-t",
                    str(self.args.bulk_seconds),
                    "-J",
                    netns=client,
                )
            )
            result.bulk_gbps = iperf["end"]["sum_received"]["bits_per_second"] / 1e9
            result.rss_mib = sum(rss_mib(pid) for pid in pids)
            if self.args.profile and mode == "ztpy":
                self.profile(pids, client)
        return result

    def profile(self, pids: list[int], client: Netns) -> None:
        """py-spy both nodes under the paced load and under bulk; collapsed stacks to files."""
        for shape, argv in (
            (
                "paced",
                [str(self.paced), "client", SERVER_IP, str(ECHO_PORT), "4", "1000", "12", "1024"],
            ),
            ("bulk", ["iperf3", "-c", SERVER_IP, "-p", str(IPERF_PORT), "-t", "12"]),
        ):
            spies = [
                subprocess.Popen(
                    [
                        "py-spy",
                        "record",
                        "--pid",
                        str(pid),
                        "--duration",
                        "10",
                        "--rate",
                        "250",
                        "--format",
                        "raw",
                        "-o",
                        str(self.work / f"profile-{shape}-{i}.txt"),
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
                for i, pid in enumerate(pids)
            ]
            sh(*argv, netns=client)
            for spy in spies:
                spy.wait(timeout=60)
            for i in range(len(pids)):
                src = self.work / f"profile-{shape}-{i}.txt"
                if src.exists():
                    dest = (
                        Path(self.args.profile_dir)
                        / f"profile-{shape}-{'client' if i == 0 else 'server'}.txt"
                    )
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy(src, dest)


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "n/a"


def row(*cells: object) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def report(results: dict[str, Result], args: argparse.Namespace) -> str:
    nm, ev, zt = results.get("nomesh"), results.get("envoy"), results.get("ztpy")
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    lines = [
        f"Run: {when}, {os.cpu_count()} vCPU, kernel {os.uname().release}, "
        f"Envoy --concurrency {args.envoy_concurrency}, ztunnel-py one process per node (uvloop).",
        "",
        f"Reproduce: `sudo python tools/bench/run.py --seconds {args.seconds}`",
        "",
        "**Istio shape: paced 1000 req/s, 1 KiB request/response, 4 long-lived connections**",
        "",
        row(
            "mesh",
            "requests",
            "p50 us",
            "p90 us",
            "p99 us",
            "added p50",
            "added p90",
            "added p99",
            "proxy vCPU (pair)",
            "of which user",
            "proxy RSS MiB (pair)",
        ),
        row(*["---"] * 11),
    ]
    for r in (nm, ev, zt):
        if r is None:
            continue
        if nm is None or r is nm:
            extra = ["-"] * 6
        else:
            extra = [f"{r.paced[i] - nm.paced[i]:.0f}" for i in (1, 2, 3)]
            extra += [f"{r.cpu_vcpu:.3f}", f"{r.cpu_user:.3f}", f"{r.rss_mib:.1f}"]
        lines.append(row(r.mode, *(f"{v:.0f}" for v in r.paced), *extra))
    lines += [
        "",
        "**Saturation (wrk, 16 connections, nginx) and bulk (iperf3, one stream)**",
        "",
        row("mesh", "wrk req/s", "wrk p50 ms", "wrk p90 ms", "wrk p99 ms", "iperf3 Gbit/s"),
        row(*["---"] * 6),
    ]
    for r in (nm, ev, zt):
        if r is None:
            continue
        lat = [f"{r.wrk_lat.get(p, 0):.2f}" for p in ("50", "90", "99")]
        lines.append(row(r.mode, f"{r.wrk_rps:.0f}", *lat, f"{r.bulk_gbps:.2f}"))
    if ev and zt and nm:
        add = [(zt.paced[i] - nm.paced[i], ev.paced[i] - nm.paced[i]) for i in (1, 2, 3)]
        figures = [
            ("proxy vCPU at 1000 req/s", zt.cpu_vcpu, ev.cpu_vcpu, ".3f"),
            ("added p50 us", *add[0], ".0f"),
            ("added p90 us", *add[1], ".0f"),
            ("added p99 us", *add[2], ".0f"),
            ("proxy RSS MiB", zt.rss_mib, ev.rss_mib, ".1f"),
            ("wrk req/s", zt.wrk_rps, ev.wrk_rps, ".0f"),
            ("bulk Gbit/s", zt.bulk_gbps, ev.bulk_gbps, ".2f"),
        ]
        lines += [
            "",
            "**ztunnel-py / Envoy, same run** (targets: CPU <= 2x, added p99 <= 3x, bulk >= 0.33x)",
            "",
            row("figure", "ztunnel-py", "Envoy", "ratio"),
            row(*["---"] * 4),
        ]
        for name, ours, theirs, fmt in figures:
            lines.append(row(name, format(ours, fmt), format(theirs, fmt), ratio(ours, theirs)))
    return "\n".join(lines)


def write_section(path: Path, body: str) -> None:
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    section = f"{SECTION_BEGIN}\n{body}\n{SECTION_END}"
    if SECTION_BEGIN in text and SECTION_END in text:
        head, rest = text.split(SECTION_BEGIN, 1)
        tail = rest.split(SECTION_END, 1)[1]
        text = head + section + tail
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    path.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=20, help="duration of the paced run")
    parser.add_argument("--wrk-seconds", type=int, default=10)
    parser.add_argument("--bulk-seconds", type=int, default=10)
    parser.add_argument("--modes", default="nomesh,envoy,ztpy")
    parser.add_argument("--envoy-concurrency", type=int, default=2)
    parser.add_argument("--profile", action="store_true", help="py-spy the ztunnel-py nodes")
    parser.add_argument("--profile-dir", default="/tmp/ztpy-bench-profiles")
    parser.add_argument("--write", default="", help="markdown file to put the results section in")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root: the benchmark creates network namespaces and iptables rules")
    with tempfile.TemporaryDirectory(prefix="ztpy-bench-") as tmp, NetnsPool() as nets:
        work = Path(tmp)
        bench = Bench(args, work)
        bench.build()
        client, server = nets.netns("bc"), nets.netns("bs")
        nets.veth_pair(client, f"{CLIENT_IP}/24", server, f"{SERVER_IP}/24")
        try:
            bench.start_apps(server)
            results = {}
            for mode in args.modes.split(","):
                print(f"== {mode}", flush=True)
                results[mode] = bench.run_mode(mode, client, server)
                print(results[mode], flush=True)
        finally:
            for p in bench.procs:
                p.terminate()
            for p in bench.procs:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(timeout=5)
        body = report(results, args)
        print(body)
        if args.write:
            write_section(Path(args.write), body)


if __name__ == "__main__":
    main()
