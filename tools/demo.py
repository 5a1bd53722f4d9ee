"""The ztunnel-py demo: a two-node ambient mesh on this machine (root).

Two nodes and four pods as network namespaces, one ztunnel-py per node with the local control
plane, a fake istio-cni agent per node handing the pods over (the real agent needs Kubernetes).
A pod on node-0 calls a service whose endpoints are all on node-1: the kernel (eBPF by default)
sends the connection to the pod's ztunnel-py, which carries it over mTLS (HBONE) to node-1's.
The pod first resolves the service's name through its DNS proxy (:15053 in the pod, reached
by the same redirection); other names go on to an upstream resolver (dnsmasq, playing the
cluster's DNS). Then a policy allows only one caller, and the other is refused.

    python -m tools.demo                    # eBPF redirection (the default)
    python -m tools.demo --redirect iptables
    python -m tools.demo --keep             # leave it running to poke at, Ctrl-C to stop
    python -m tools.demo --istiod           # against the real istiod and API server (tools/lab)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from tools.testbed.mesh import Mesh, MeshOptions
from tools.testbed.plan import local_config
from tools.testbed.resolver import RESOLVER_IP, UpstreamResolver, write_resolv_conf
from ztunnel_py.testing.daemon import Daemon, http

SERVICE = "reviews"
SERVICE_VIP = "10.96.0.50"
SERVER_PODS = ("pod-1-0", "pod-1-1")  # both on node-1
ALLOWED, REFUSED = "pod-0-0", "pod-0-1"  # both on node-0, service accounts app-0 and app-1
POLICY = "default/reviews-callers"
KUBE_DNS = "10.96.0.53"  # where a pod's resolv.conf points; the capture takes it to :15053
DNS_CLIENT = Path(__file__).parent / "testbed" / "dnsclient.py"


def say(text: str = "") -> None:
    try:
        print(text, flush=True)
    except BrokenPipeError:  # whoever read our output went away: carry on, so teardown runs
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (replaces stdout for good)


def mesh_config(mesh: Mesh, *, with_policy: bool) -> dict[str, Any]:
    """The testbed's mesh plus a ``reviews`` service backed only by node-1's pods."""
    doc = local_config(mesh.plan)
    key = f"default/{SERVICE}.default.svc.cluster.local"
    for w in doc["workloads"]:
        if w["name"] in SERVER_PODS:
            w["services"][key] = {80: mesh.plan.http_port, 9000: mesh.plan.echo_port}
            if with_policy:
                w["authorizationPolicies"] = [POLICY]
    doc["services"].append(
        {
            "name": SERVICE,
            "namespace": "default",
            "hostname": f"{SERVICE}.default.svc.cluster.local",
            "vips": [f"/{SERVICE_VIP}"],
            "ports": {80: mesh.plan.http_port, 9000: mesh.plan.echo_port},
        }
    )
    if with_policy:
        caller = mesh.pod(ALLOWED).identity.removeprefix("spiffe://")
        doc["policies"] = [
            {
                "name": POLICY.split("/")[1],
                "namespace": "default",
                "scope": "WorkloadSelector",
                "action": "Allow",
                "rules": [[[{"principals": [{"Exact": caller}]}]]],
            }
        ]
    return doc


def apply(mesh: Mesh, doc: dict[str, Any]) -> None:
    """Write the config both daemons watch and wait until both have loaded it."""
    before = {n: d.config_dump()["staticConfig"]["loads"] for n, d in mesh.daemons.items()}
    tmp = mesh.config_path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(doc, sort_keys=False))
    tmp.replace(mesh.config_path)
    deadline = time.monotonic() + 30
    while any(
        d.config_dump()["staticConfig"]["loads"] <= before[n] for n, d in mesh.daemons.items()
    ):
        if time.monotonic() > deadline:
            raise TimeoutError("the daemons did not reload the local config")
        time.sleep(0.1)


def access_lines(daemon: Daemon, since: int) -> list[str]:
    return [line for line in daemon.log()[since:].splitlines() if "connection complete" in line]


def fields(line: str, *names: str) -> str:
    found = dict(re.findall(r'(\S+?)=("[^"]*"|\S+)', line))
    return "  ".join(f"{n}={found[n].strip(chr(34))}" for n in names if n in found)


def call(mesh: Mesh, pod: str) -> dict[str, Any]:
    return mesh.client(pod, "http", SERVICE_VIP, 80)


def resolve(mesh: Mesh, pod: str, name: str) -> str:
    proc = mesh.bed.run(pod, [sys.executable, str(DNS_CLIENT), "query", KUBE_DNS, name, "A"])
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    reply = json.loads(lines[-1]) if lines else {"error": proc.stderr.strip()}
    if "rcode" not in reply:
        return f"no answer ({reply.get('error')})"
    answers = ", ".join(a[2] for a in reply["answers"]) or "-"
    source = "ztunnel-py, from the mesh" if reply["aa"] else "forwarded upstream"
    return f"{reply['rcode']} {answers}  ({source})"


def run(args: argparse.Namespace) -> int:
    work = Path(tempfile.mkdtemp(prefix="ztunnel-py-demo-"))
    resolv = write_resolv_conf(work / "resolv.conf", [RESOLVER_IP])
    options = MeshOptions(tag="demo", redirect=args.redirect, env={"DNS_RESOLV_CONF": str(resolv)})
    say(f"== building a 2-node mesh ({args.redirect} redirection), work dir {work}")
    mesh = Mesh(options, work)
    resolver = UpstreamResolver(mesh.plan, work / "resolver", {"www.example.test": ["192.0.2.80"]})
    mesh.up()
    try:
        resolver.up()
        apply(mesh, mesh_config(mesh, with_policy=False))
        node0, node1 = mesh.daemons["node-0"], mesh.daemons["node-1"]
        for node in mesh.plan.nodes:
            d = mesh.daemons[node.name]
            mode = d.config_dump()["dataPlane"]["redirectMode"]
            say(f"   {node.name}: ztunnel-py pid {d.proc.pid}, redirect {mode}, admin {d.admin}")
            for pod in mesh.plan.pods_on(node.name):
                say(f"      {pod.name:8} {pod.ip:12} {pod.identity}")
        say(
            f"   service {SERVICE}.default.svc.cluster.local  VIP {SERVICE_VIP}:80"
            f" -> {', '.join(SERVER_PODS)}"
        )

        say(f"\n== {ALLOWED} (node-0) asks DNS ({KUBE_DNS}:53, captured to its :15053)")
        for name in (f"{SERVICE}.default.svc.cluster.local", SERVICE, "www.example.test"):
            say(f"   {name:38} -> {resolve(mesh, ALLOWED, name + '.')}")

        say(f"\n== {ALLOWED} (node-0) calls http://{SERVICE_VIP}/ three times")
        marks = (len(node0.log()), len(node1.log()))
        for _ in range(3):
            reply = call(mesh, ALLOWED)
            say(
                f"   answered by {reply.get('body', '').strip() or reply}"
                f"  (the app sees peer {reply.get('peer')})"
            )
        time.sleep(0.3)
        say("   node-0's ztunnel-py (source side) logged:")
        for line in access_lines(node0, marks[0])[:3]:
            say(
                "     "
                + fields(
                    line,
                    "src.identity",
                    "dst.identity",
                    "dst.hbone_addr",
                    "bytes_sent",
                    "bytes_recv",
                )
            )
        say("   node-1's ztunnel-py (destination side) verified the caller's certificate:")
        for line in access_lines(node1, marks[1])[:3]:
            say(
                "     "
                + fields(
                    line, "src.identity", "dst.identity", "dst.addr", "bytes_sent", "bytes_recv"
                )
            )

        say(f"\n== a policy now allows only {mesh.pod(ALLOWED).identity} to call {SERVICE}")
        apply(mesh, mesh_config(mesh, with_policy=True))
        for caller in (ALLOWED, REFUSED):
            reply = call(mesh, caller)
            verdict = (
                f"answered by {reply['body'].strip()}"
                if reply.get("result") == "ok" and reply.get("body")
                else f"refused ({reply.get('result')}: {reply.get('error', 'no answer')})"
            )
            say(f"   {caller} ({mesh.pod(caller).identity.rsplit('/', 1)[1]}): {verdict}")
        time.sleep(0.3)
        refused = [line for line in access_lines(node1, 0) if "policy rejection" in line]
        if refused:
            say("   node-1's ztunnel-py (destination side) logged:")
            say("     " + fields(refused[-1], "src.identity", "dst.identity", "error"))
        failed = [line for line in access_lines(node0, 0) if "401" in line]
        if failed:
            say("   node-0's ztunnel-py (source side) logged:")
            say("     " + fields(failed[-1], "src.identity", "dst.hbone_addr", "error"))

        say("\n== look around")
        for node in mesh.plan.nodes:
            d = mesh.daemons[node.name]
            say(
                f"   {node.name}: curl {d.admin}/config_dump    curl {d.stats}/metrics    "
                f"ztunnel-py config-dump --admin 127.0.0.1:{d.admin_port}"
            )
        metrics = http(node1.stats + "/metrics").text
        opened = [
            line
            for line in metrics.splitlines()
            if line.startswith("istio_tcp_connections_opened_total")
        ]
        if opened:
            say(f"   e.g. node-1 istio_tcp_connections_opened_total has {len(opened)} series")
        dump = node0.config_dump()
        say(f"   node-0 /config_dump keys: {', '.join(sorted(dump))}")
        if args.redirect == "ebpf":
            bpf = dump["dataPlane"].get("bpf", {})
            say(f"   node-0 BPF maps: {', '.join(sorted(bpf.get('maps', {})))}")

        if args.keep:
            say("\n== running; Ctrl-C to tear everything down")
            signal.sigwait({signal.SIGINT, signal.SIGTERM})
        return 0
    finally:
        say("\n== tearing down")
        resolver.down()
        mesh.down()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tools.demo", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--redirect", choices=["ebpf", "iptables"], default="ebpf")
    parser.add_argument("--keep", action="store_true", help="keep the mesh running until Ctrl-C")
    parser.add_argument(
        "--istiod",
        action="store_true",
        help="use the Istio lab: real istiod and kube-apiserver (built by tools/lab/build.sh)",
    )
    args = parser.parse_args(argv)
    if args.keep:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    else:
        demo_pid = os.getpid()

        def tear_down_on(signum: int, _frame: object) -> None:
            if os.getpid() != demo_pid:  # a fork (pyroute2's netns helper) just dies, as before
                signal.signal(signum, signal.SIG_DFL)
                os.kill(os.getpid(), signum)
                return
            sys.exit(128 + signum)  # unwinds through the ``finally`` that tears everything down

        for signum in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, tear_down_on)
    if args.istiod:
        from tools.lab.demo import run as run_lab  # needs the lab's binaries and client

        return run_lab(args.keep, args.redirect)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
