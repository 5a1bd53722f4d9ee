"""The demo against the real control plane (``tools/demo.sh --istiod``, root).

The lab's etcd, kube-apiserver and istiod start on this machine; the testbed is registered with
the API server; one ztunnel-py per node connects to istiod exactly as in a cluster. A pod calls a
service; an AuthorizationPolicy is applied through the API server (kubectl) and refuses one
caller; the demo ends with istioctl's tables for each daemon's ``/config_dump``.
"""

from __future__ import annotations

import json
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from tools.lab.mesh import LabMesh, LabOptions
from ztunnel_py.testing.daemon import Daemon

NAMESPACE = "lab-ambient"
SERVICE = "app-1"
ALLOWED, REFUSED = "pod-0-0", "pod-0-1"  # service accounts app-0 and app-1, on node-0
POLICY = "app-1-callers"
ISTIOCTL_TABLES = ("workloads", "services", "policies", "certificates", "connections")


def say(text: str = "") -> None:
    print(text, flush=True)


def _access(daemon: Daemon, since: int) -> list[dict[str, Any]]:
    return [
        json.loads(line)
        for line in daemon.log()[since:].splitlines()
        if line.startswith("{") and '"connection complete"' in line
    ]


def _call(lab: LabMesh, pod: str, vip: str) -> str:
    reply = lab.client(pod, "http", vip, 80)
    if reply.get("result") == "ok" and reply.get("body"):
        return f"answered by {reply['body'].strip()}"
    return f"refused ({reply.get('result')}: {reply.get('error', 'no answer')})"


def _wait_policy(lab: LabMesh, present: bool) -> None:
    deadline = time.monotonic() + 60
    while True:
        have = [
            any(p["name"] == POLICY for p in d.config_dump()["policies"])
            for d in lab.daemons.values()
        ]
        if all(h == present for h in have):
            return
        if time.monotonic() > deadline:
            raise TimeoutError("istiod did not push the AuthorizationPolicy to every daemon")
        time.sleep(0.2)


def run(keep: bool, redirect: str) -> int:
    work = Path(tempfile.mkdtemp(prefix="ztunnel-py-lab-demo-"))
    say(f"== starting etcd, kube-apiserver and istiod, and a 2-node testbed; work dir {work}")
    lab = LabMesh(LabOptions(tag="labdemo", redirect=redirect, env={"LOG_FORMAT": "json"}), work)
    lab.up()
    try:
        steps = ", ".join(f"{k} {v}s" for k, v in lab.cp.timings.items())
        say(f"   up in {lab.timings['total']}s ({steps})")
        say(f"   kubectl --kubeconfig {lab.cp.kubeconfig} get pods -A")
        say("   " + lab.cp.kubectl("get", "pods", "-A", "-o", "wide").replace("\n", "\n   "))
        say(f"   istiod: {lab.cp.istiod_address} (debug {lab.cp.istiod_debug_url})")
        for node in lab.plan.nodes:
            d = lab.daemons[node.name]
            say(f"   {node.name}: ztunnel-py pid {d.proc.pid}, admin {d.admin}")

        vip = next(s.vip for s in lab.plan.services if s.name == SERVICE)
        say(f"\n== {ALLOWED} calls {SERVICE}.{NAMESPACE} (VIP {vip}) three times")
        mark = {n: len(d.log()) for n, d in lab.daemons.items()}
        for _ in range(3):
            say(f"   {_call(lab, ALLOWED, vip)}")
        time.sleep(0.3)
        for name, daemon in lab.daemons.items():
            for rec in _access(daemon, mark[name])[:3]:
                say(
                    f"   {name} logged: src.identity={rec.get('src.identity')} "
                    f"dst.identity={rec.get('dst.identity')} bytes_sent={rec.get('bytes_sent')}"
                )

        policy = {
            "apiVersion": "security.istio.io/v1",
            "kind": "AuthorizationPolicy",
            "metadata": {"name": POLICY, "namespace": NAMESPACE},
            "spec": {
                "selector": {"matchLabels": {"app": SERVICE}},
                "action": "ALLOW",
                "rules": [
                    {
                        "from": [
                            {"source": {"principals": [f"cluster.local/ns/{NAMESPACE}/sa/app-0"]}}
                        ]
                    }
                ],
            },
        }
        say(f"\n== kubectl apply: only {NAMESPACE}/app-0 may call {SERVICE}")
        say("   " + yaml.safe_dump(policy, sort_keys=False).replace("\n", "\n   "))
        say("   " + lab.cp.kubectl("apply", "-f", "-", input_text=yaml.safe_dump(policy)).strip())
        _wait_policy(lab, True)
        for caller in (ALLOWED, REFUSED):
            say(f"   {caller} ({lab.pod(caller).service_account}): {_call(lab, caller, vip)}")

        say("\n== istioctl ztunnel-config ... --file <each daemon's /config_dump>")
        for name, daemon in lab.daemons.items():
            dump = work / f"{name}-config_dump.json"
            dump.write_text(json.dumps(daemon.config_dump()))
            for table in ISTIOCTL_TABLES:
                argv = [
                    str(lab.cp.binaries.istioctl),
                    f"--kubeconfig={lab.cp.kubeconfig}",
                    "ztunnel-config",
                    table,
                    "--file",
                    str(dump),
                ]
                proc = subprocess.run(argv, capture_output=True, text=True, check=False)
                say(f"\n$ istioctl ztunnel-config {table} --file {dump.name}")
                say((proc.stdout + proc.stderr).rstrip())

        if keep:
            say("\n== running; Ctrl-C to tear everything down")
            signal.sigwait({signal.SIGINT, signal.SIGTERM})
        return 0
    finally:
        say("\n== tearing down")
        lab.down()
