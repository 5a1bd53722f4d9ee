"""Upstream ztunnel (Istio's Rust daemon) as a benchmark peer on the testbed (root).

The binary is not part of this repository and nothing here builds it: build it by hand from
Istio's public ztunnel repository with the ``testing`` feature (for ``FAKE_CA``, its built-in
test CA, which lets two ztunnels trust each other without istiod) and pass its path with
``tools/bench/run.py --ztunnel-bin PATH``; docs/BENCHMARKS.md says how it was built.

It runs exactly where ztunnel-py's daemons run in the ``iptables`` setup: one per node, in the
node's network namespace (a DaemonSet pod with host networking), its pods enrolled over ZDS by
the testbed's fake istio-cni agent, redirection by istio-cni's in-pod iptables rules, and the
workloads from the same local config (``LOCAL_XDS_PATH``, ztunnel's own format).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

from tools.testbed.mesh import Mesh

ADMIN_PORT, STATS_PORT, READINESS_PORT = 15000, 15020, 15021  # ztunnel's fixed ports
OPENED = "istio_tcp_connections_opened_total"
READY_TIMEOUT_S = 60.0


def upstream_env(mesh: Mesh, node: str) -> dict[str, str]:
    """What a ztunnel needs to serve a testbed node without Kubernetes or istiod."""
    return {
        "FAKE_CA": "true",
        "LOCAL_XDS_PATH": str(mesh.config_path),
        "XDS_ADDRESS": "",  # empty: no istiod, the local config is the whole state
        "INPOD_UDS": str(mesh.agent_socket(node)),
        "NODE_NAME": node,
        "POD_NAME": f"ztunnel-{node}",
        "POD_NAMESPACE": "istio-system",
        "CLUSTER_ID": "Kubernetes",
        "RUST_LOG": os.environ.get("ZTPY_BENCH_RUST_LOG", "error"),
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
    }


def _in_node(mesh: Mesh, node: str, argv: list[str]) -> list[str]:
    return ["nsenter", f"--net=/run/netns/{mesh.plan.node(node).netns}", "--", *argv]


def _get(mesh: Mesh, node: str, port: int, path: str) -> tuple[int, str]:
    """(HTTP status, body) of a GET on the node's loopback; status 0 when nothing answers."""
    url = f"http://127.0.0.1:{port}{path}"
    proc = subprocess.run(
        _in_node(mesh, node, ["curl", "-s", "-m", "5", "-w", "\n%{http_code}", url]),
        capture_output=True,
        text=True,
        check=False,
    )
    body, _, code = proc.stdout.rpartition("\n")
    return (int(code) if code.isdigit() else 0), body


def opened(mesh: Mesh) -> int:
    """Connections the ztunnels have opened so far (the Istio TCP metric both daemons keep)."""
    total = 0.0
    for node in mesh.plan.nodes:
        _, text = _get(mesh, node.name, STATS_PORT, "/metrics")
        for line in text.splitlines():
            if line.startswith(OPENED + "{"):
                total += float(line.rsplit(" ", 1)[1])
    return int(total)


@contextlib.contextmanager
def ztunnels(mesh: Mesh, binary: Path, log_dir: Path) -> Iterator[list[int]]:
    """One upstream ztunnel per node of ``mesh`` (brought up with every node ``external``),
    ready; yields their pids (nsenter execs, so the pid is ztunnel's)."""
    procs: list[subprocess.Popen[bytes]] = []
    log_dir.mkdir(parents=True, exist_ok=True)
    try:
        for node in mesh.plan.nodes:
            with open(log_dir / f"ztunnel-{node.name}.log", "wb") as log:
                procs.append(
                    subprocess.Popen(
                        _in_node(mesh, node.name, [str(binary)]),
                        env=upstream_env(mesh, node.name),
                        stdout=log,
                        stderr=subprocess.STDOUT,
                    )
                )
        for node, proc in zip(mesh.plan.nodes, procs, strict=True):
            _wait_ready(mesh, node.name, proc, log_dir)
            comm = Path(f"/proc/{proc.pid}/comm").read_text().strip()
            if comm != "ztunnel":
                raise RuntimeError(f"pid {proc.pid} is {comm!r}, not ztunnel: cannot meter it")
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


def _wait_ready(mesh: Mesh, node: str, proc: subprocess.Popen[bytes], log_dir: Path) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    status, body = 0, ""
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                f"upstream ztunnel on {node} exited {proc.returncode}:\n{_tail(log_dir, node)}"
            )
        status, body = _get(mesh, node, READINESS_PORT, "/healthz/ready")
        if status == 200:
            return
        time.sleep(0.2)
    raise RuntimeError(
        f"upstream ztunnel on {node} not ready after {READY_TIMEOUT_S:.0f} s (last status "
        f"{status}: {body.strip()!r}); its log ends:\n{_tail(log_dir, node)}"
    )


def _tail(log_dir: Path, node: str, lines: int = 20) -> str:
    """The end of a ztunnel's log, for an error (the run's work directory is removed)."""
    path = log_dir / f"ztunnel-{node}.log"
    text = path.read_text(errors="replace") if path.exists() else "(no log)"
    return "\n".join(text.splitlines()[-lines:])
