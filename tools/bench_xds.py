"""Benchmark: a large mesh pushed through the real delta-ADS gRPC path (not a test).

The parent process serves ``--workloads`` workloads, ``--services`` services and ``--policies``
policies from a ``FakeIstiod`` over TLS on loopback. A child process runs an ``XdsClient`` into
a ``ProxyState`` and reports how long it took from starting the client to readiness (every
watched type ACKed, everything applied) and its resident memory at that point.

Usage::

    python tools/bench_xds.py                       # 10,000 / 1,000 / 1,000
    python tools/bench_xds.py --workloads 1000 --services 100 --policies 100

Prints one markdown table row (with a header) and the command that produced it.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path

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


# --- child: the measured process -------------------------------------------------------------


def _rss_kib() -> tuple[int, int]:
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in {"VmRSS", "VmHWM"}:
            fields[key] = int(value.split()[0])
    return fields["VmRSS"], fields["VmHWM"]


async def _child(address: str, root: str) -> dict[str, float]:
    from prometheus_client import CollectorRegistry

    from ztunnel_py.config import from_env
    from ztunnel_py.state.store import ProxyState
    from ztunnel_py.xds.client import XdsClient, XdsMetrics

    config = from_env(
        {"XDS_ADDRESS": address, "XDS_ROOT_CA": root, "MESH_CONFIG_PATH": "/nonexistent"}
    )
    state = ProxyState()
    ready = asyncio.Event()
    client = XdsClient(config, state.apply, XdsMetrics(CollectorRegistry()), on_ready=ready.set)
    start = time.perf_counter()
    task = asyncio.create_task(client.run())
    await ready.wait()
    elapsed = time.perf_counter() - start
    rss, peak = _rss_kib()
    task.cancel()
    return {
        "time_to_ready_s": elapsed,
        "rss_mib": rss / 1024,
        "peak_rss_mib": peak / 1024,
        "workloads": float(sum(1 for _ in state.workloads())),
        "services": float(sum(1 for _ in state.services())),
        "policies": float(sum(1 for _ in state.policies())),
    }


# --- parent: serve and report ------------------------------------------------------------------


async def _parent(args: argparse.Namespace) -> dict[str, float]:
    from ztunnel_py.testing.istiod import FakeIstiod

    batch = mesh(args.workloads, args.services, args.policies)
    async with FakeIstiod(batch=batch) as istiod:
        with tempfile.TemporaryDirectory(prefix="bench_xds.") as tmp:
            root = Path(tmp) / "root-cert.pem"
            root.write_bytes(istiod.root_pem)
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                __file__,
                "--child",
                istiod.address,
                str(root),
                stdout=asyncio.subprocess.PIPE,
            )
            out, _ = await proc.communicate()
    if proc.returncode != 0:
        sys.exit(f"child failed with exit code {proc.returncode}")
    result: dict[str, float] = json.loads(out)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--workloads", type=int, default=10_000)
    parser.add_argument("--services", type=int, default=1_000)
    parser.add_argument("--policies", type=int, default=1_000)
    parser.add_argument("--child", nargs=2, metavar=("ADDRESS", "ROOT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(asyncio.run(_child(*args.child))))
        return 0
    r = asyncio.run(_parent(args))
    got = (int(r["workloads"]), int(r["services"]), int(r["policies"]))
    if got != (args.workloads, args.services, args.policies):
        print(f"warning: the child applied {got}, not what was pushed", file=sys.stderr)
    print(
        "| workloads | services | policies | time to ready (s) "
        "| RSS at ready (MiB) | peak RSS (MiB) |"
    )
    print("|---:|---:|---:|---:|---:|---:|")
    print(
        f"| {got[0]} | {got[1]} | {got[2]} | {r['time_to_ready_s']:.2f} "
        f"| {r['rss_mib']:.0f} | {r['peak_rss_mib']:.0f} |"
    )
    cmd = ["python", "tools/bench_xds.py", *(argv if argv is not None else sys.argv[1:])]
    print(f"\ncommand: {shlex.join(cmd)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
