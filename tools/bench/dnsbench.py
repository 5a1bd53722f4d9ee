"""DNS benchmark: queries/s and latency through the pod's DNS proxy vs dnsmasq directly (root).

A one-node testbed mesh (two pods) with the real daemon, and dnsmasq as the upstream resolver
in a namespace of its own on the fabric (``tools/testbed/resolver.py``). From pod-0-0, a
closed-loop load generator (``dnsload.py``, ``--concurrency`` queries in flight over UDP) runs
for ``--seconds`` against:

* ``mesh``: a service name, answered by the proxy from the mesh state;
* ``forwarded``: a name of dnsmasq's zone, forwarded by the proxy to dnsmasq;
* ``direct``: the same name sent straight to dnsmasq from a socket marked 0x539, which the
  capture (istio-cni's rules or the BPF programs) leaves alone: no proxy at all.

    sudo python -m tools.bench.dnsbench [--seconds 3] [--concurrency 8] [--redirect iptables|ebpf]
"""

from __future__ import annotations

import argparse
import json
import secrets
import sys
import tempfile
from pathlib import Path
from typing import Any

from tools.testbed.mesh import Mesh, MeshOptions
from tools.testbed.resolver import RESOLVER_IP, UpstreamResolver, write_resolv_conf

LOAD = Path(__file__).with_name("dnsload.py")
CLIENT = "pod-0-0"
KUBE_DNS = "10.96.0.53"
CASES = (
    ("mesh", KUBE_DNS, "app-1.default.svc.cluster.local.", 0),
    ("forwarded", KUBE_DNS, "www.example.test.", 0),
    ("direct", RESOLVER_IP, "www.example.test.", 0x539),
)


def run(seconds: float, concurrency: int, redirect: str) -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory(prefix="ztpy-dns-bench-") as tmp:
        work = Path(tmp)
        resolv = write_resolv_conf(work / "resolv.conf", [RESOLVER_IP], timeout_s=2, attempts=2)
        mesh = Mesh(
            MeshOptions(
                tag=f"dnsb{secrets.token_hex(2)}",
                nodes=1,
                pods_per_node=2,
                redirect=redirect,
                env={"DNS_RESOLV_CONF": str(resolv), "RUST_LOG": "warn"},
            ),
            work / "mesh",
        )
        resolver = UpstreamResolver(
            mesh.plan, work / "resolver", {"www.example.test": ["192.0.2.1"]}
        )
        results = []
        try:
            mesh.up()
            resolver.up()
            for case, server, name, mark in CASES:
                argv = [sys.executable, str(LOAD), server, name, str(seconds), str(concurrency),
                        str(mark)]  # fmt: skip
                proc = mesh.bed.run(CLIENT, argv, timeout=seconds + 60)
                if proc.returncode != 0:
                    raise RuntimeError(f"{case}: load generator failed: {proc.stderr}")
                result = json.loads(proc.stdout.strip().splitlines()[-1])
                results.append({"case": case, **result})
        finally:
            resolver.down()
            mesh.down()
        return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--redirect", choices=("iptables", "ebpf"), default="iptables")
    args = parser.parse_args()
    results = run(args.seconds, args.concurrency, args.redirect)
    print(f"{'case':10} {'queries/s':>10} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'lost':>5}")
    for r in results:
        print(
            f"{r['case']:10} {r['qps']:10.0f} {r['p50_ms']:8.2f} {r['p90_ms']:8.2f}"
            f" {r['p99_ms']:8.2f} {r['lost']:5d}"
        )


if __name__ == "__main__":
    main()
