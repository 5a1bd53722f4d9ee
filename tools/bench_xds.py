"""Benchmark: a large mesh pushed through the real delta-ADS gRPC path into the real daemon.

A ``FakeIstiod`` (TLS on loopback, in this process) serves ``--workloads`` workloads,
``--services`` services and ``--policies`` policies; a ``ztunnel-py run`` process connects to
it and the benchmark times it to readiness (every watched type ACKed, everything applied) and
reads its resident memory then. With ``--ebpf`` (root) the daemon also mirrors the state into
its BPF maps before it is ready (a fake istio-cni agent with no pods completes its enrolment).

Usage::

    python tools/bench_xds.py                       # 10,000 / 1,000 / 1,000, state only
    sudo python tools/bench_xds.py --ebpf           # ... and the BPF maps
    python tools/bench_xds.py --workloads 1000 --services 100 --policies 100

Prints one markdown table row (with a header) and the command that produced it. Not a test:
numbers vary with the machine; the targets (2 s, 150 MB) are checked by reading them.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from ztunnel_py.rbac.model import (  # noqa: E402 (after the path fix for direct runs)
    Action,
    Authorization,
    Match,
    Scope,
    StringMatch,
    StringMatchKind,
)
from ztunnel_py.state.model import (  # noqa: E402
    InboundProtocol,
    NetworkAddress,
    Service,
    Workload,
    frozen_map,
)
from ztunnel_py.state.store import UpdateBatch  # noqa: E402


def mesh(workloads: int, services: int, policies: int) -> UpdateBatch:
    """A synthetic mesh: workloads spread over 100 namespaces, each behind one service."""
    svcs = []
    for i in range(services):
        ns = f"ns-{i % 100}"
        svcs.append(
            Service(
                name=f"svc-{i}",
                namespace=ns,
                hostname=f"svc-{i}.{ns}.svc.cluster.local",
                vips=(NetworkAddress("", ipaddress.IPv4Address(0x0A600000 + i)),),
                ports=frozen_map({80: 8080, 443: 8443}),
                subject_alt_names=(f"spiffe://cluster.local/ns/{ns}/sa/svc-{i}",),
            )
        )
    wls = []
    for i in range(workloads):
        svc = svcs[i % services] if services else None
        ns = svc.namespace if svc else f"ns-{i % 100}"
        wls.append(
            Workload(
                uid=f"Kubernetes//v1/Pod/{ns}/pod-{i}",
                name=f"pod-{i}",
                namespace=ns,
                workload_ips=(ipaddress.IPv4Address(0x0A000000 + i + 1),),
                protocol=InboundProtocol.HBONE,
                service_account=svc.name if svc else "default",
                node=f"node-{i % 50}",
                canonical_name=svc.name if svc else f"pod-{i}",
                workload_name=svc.name if svc else f"pod-{i}",
                services=frozen_map({svc.key: frozen_map({80: 8080, 443: 8443})})
                if svc
                else frozen_map(),
            )
        )
    pols = []
    for i in range(policies):
        ns = f"ns-{i % 100}"
        match = Match(
            principals=(
                StringMatch(StringMatchKind.EXACT, f"cluster.local/ns/{ns}/sa/client-{i}"),
            ),
            destination_ports=(8080,),
        )
        pols.append(
            Authorization(
                name=f"policy-{i}",
                namespace=ns,
                scope=Scope.NAMESPACE,
                action=Action.DENY if i % 10 == 0 else Action.ALLOW,
                rules=(((match,),),),
            )
        )
    return UpdateBatch(workloads=tuple(wls), services=tuple(svcs), policies=tuple(pols))


# --- the measured daemon ---------------------------------------------------------------------


def _rss_mib(pid: int) -> tuple[float, float]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in {"VmRSS", "VmHWM"}:
            fields[key] = int(value.split()[0]) / 1024
    return fields["VmRSS"], fields["VmHWM"]


def _wait(url: str, status: int, proc: Any, timeout: float = 120) -> float:
    """Poll ``url`` every 5 ms until it answers ``status``; the monotonic time it did."""
    from ztunnel_py.testing.daemon import http

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"the daemon exited with {proc.returncode}")
        try:
            if http(url, timeout=1).status == status:
                return time.monotonic()
        except OSError:
            pass
        time.sleep(0.005)
    sys.exit(f"{url} did not answer {status} within {timeout}s")


def run(args: argparse.Namespace) -> dict[str, float]:
    """Serve the mesh from a fake istiod; start a real daemon against it; time it to ready."""
    import subprocess

    from ztunnel_py.testing.background import BackgroundLoop
    from ztunnel_py.testing.cni_agent import FakeCniAgent
    from ztunnel_py.testing.daemon import free_port, http
    from ztunnel_py.testing.istiod import FakeIstiod

    batch = mesh(args.workloads, args.services, args.policies)
    loop = BackgroundLoop("bench-istiod")
    with tempfile.TemporaryDirectory(prefix="bench_xds.") as tmp_name:
        tmp = Path(tmp_name)
        istiod = FakeIstiod(batch=batch)
        loop.run(istiod.start())
        ports = {
            "ADMIN_PORT": free_port(),
            "STATS_PORT": free_port(),
            "READINESS_PORT": free_port(),
        }
        env = {
            "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
            "XDS_ADDRESS": istiod.address,
            "XDS_ROOT_CA": istiod.root_pem.decode(),
            "FAKE_CA": "true",
            "MESH_CONFIG_PATH": "/nonexistent",
            **{k: str(v) for k, v in ports.items()},
        }
        cgroup = None
        if args.ebpf:
            from tools.testbed.bed import cgroup2_mount

            mount = cgroup2_mount()
            if mount is None:
                sys.exit("--ebpf needs a cgroup v2 mount")
            cgroup = mount / f"ztunnel-py-bench-xds-{os.getpid()}"
            cgroup.mkdir()
            agent = FakeCniAgent(tmp / "ztunnel.sock")  # no pods: an empty snapshot
            loop.run(agent.start())
            env.update(
                REDIRECT_MODE="ebpf",
                BPF_CGROUP_PATH=str(cgroup),
                BPF_PIN_PATH=f"/sys/fs/bpf/ztunnel-py-bench-xds-{os.getpid()}",
                INPOD_UDS=str(tmp / "ztunnel.sock"),
            )
        else:
            env["INPOD_ENABLED"] = "false"
        started = time.monotonic()
        proc = subprocess.Popen(
            [sys.executable, "-m", "ztunnel_py", "run"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=open(tmp / "daemon.log", "wb"),  # noqa: SIM115 (the child owns it)
        )
        try:
            ready_url = f"http://127.0.0.1:{ports['READINESS_PORT']}/healthz/ready"
            listening = _wait(ready_url, 503, proc) if not args.ebpf else started
            ready = _wait(ready_url, 200, proc)
            rss, peak = _rss_mib(proc.pid)
            dump = http(f"http://127.0.0.1:{ports['ADMIN_PORT']}/config_dump", timeout=60).json()
        finally:
            proc.terminate()
            proc.wait(timeout=30)
            loop.run(istiod.stop())
            loop.close()
            if args.ebpf:
                from ztunnel_py.bpf.loader import BpfLoader

                assert cgroup is not None
                BpfLoader(pin_path=Path(env["BPF_PIN_PATH"]), cgroup_path=cgroup).uninstall()
                cgroup.rmdir()
    result = {
        "start_to_ready_s": ready - started,
        "listening_to_ready_s": ready - listening,
        "rss_mib": rss,
        "peak_rss_mib": peak,
        "workloads": float(len(dump["workloads"])),
        "services": float(len(dump["services"])),
        "policies": float(len(dump["policies"])),
    }
    if args.ebpf:
        maps = dump["dataPlane"]["bpf"]["maps"]
        result["bpf_destinations"] = float(len(maps.get("zt_dst", [])))
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--workloads", type=int, default=10_000)
    parser.add_argument("--services", type=int, default=1_000)
    parser.add_argument("--policies", type=int, default=1_000)
    parser.add_argument(
        "--ebpf", action="store_true", help="also mirror the state into BPF maps (root)"
    )
    args = parser.parse_args(argv)
    r = run(args)
    got = (int(r["workloads"]), int(r["services"]), int(r["policies"]))
    if got != (args.workloads, args.services, args.policies):
        print(f"warning: the daemon holds {got}, not what was pushed", file=sys.stderr)
    mode = "eBPF maps" if args.ebpf else "state only"
    print(
        "| workloads | services | policies | mirrored into | process start to ready (s) "
        "| ports open to ready (s) | RSS at ready (MiB) | peak RSS (MiB) | BPF destinations |"
    )
    print("|---:|---:|---:|---|---:|---:|---:|---:|---:|")
    sync = f"{r['listening_to_ready_s']:.2f}" if not args.ebpf else "-"
    dests = f"{int(r['bpf_destinations'])}" if args.ebpf else "-"
    print(
        f"| {got[0]} | {got[1]} | {got[2]} | {mode} | {r['start_to_ready_s']:.2f} | {sync} "
        f"| {r['rss_mib']:.0f} | {r['peak_rss_mib']:.0f} | {dests} |"
    )
    cmd = ["python", "tools/bench_xds.py", *(argv if argv is not None else sys.argv[1:])]
    print(f"\ncommand: {shlex.join(cmd)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
