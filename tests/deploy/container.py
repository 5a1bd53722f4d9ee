"""The daemon in its container image, started from a rendered DaemonSet (tools/k8s/podrun.py).

``PodContainer`` is the container of one node's ztunnel pod: it has its own network namespace
(podman ``--network none``, as a pod has its own), so its admin, metrics and readiness ports
are reached from inside that namespace, the way the kubelet's probe reaches the pod.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import shutil
import socket
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tools.k8s.podrun import Node, podman_run_argv
from tools.k8s.render import ROOT
from ztunnel_py.netns import run_in_netns
from ztunnel_py.testing.daemon import HttpReply
from ztunnel_py.testing.poll import HANG_GUARD_S, wait_until
from ztunnel_py.testing.privileged import require

READINESS_PORT, ADMIN_PORT, STATS_PORT = 15021, 15000, 15020


def built_image() -> str:
    """Build (or find in podman's layer cache) the image of this tree; its name."""
    require(
        shutil.which("podman") is not None and shutil.which("debootstrap") is not None,
        "podman and debootstrap (run tools/setup.sh)",
    )
    out = subprocess.run(
        [str(ROOT / "tools" / "image" / "build.sh")],
        capture_output=True,
        text=True,
        check=False,
        timeout=900,
    )
    assert out.returncode == 0, f"tools/image/build.sh failed:\n{out.stderr[-4000:]}"
    return out.stdout.strip().splitlines()[-1]


@dataclass
class PodContainer:
    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def pid(self) -> int:
        out = subprocess.run(
            ["podman", "inspect", "--format", "{{.State.Pid}}", self.name],
            capture_output=True,
            text=True,
            check=True,
            timeout=HANG_GUARD_S,
        )
        return int(out.stdout.strip())

    def http(self, port: int, path: str, method: str = "GET") -> HttpReply:
        """A request to the container's ``127.0.0.1:port``, made inside its netns."""
        fd = os.open(f"/proc/{self.pid()}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            sock = run_in_netns(fd, lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM))
        finally:
            os.close(fd)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        conn.sock = sock  # closed by conn.close() whatever happens below
        try:
            sock.settimeout(5)
            sock.connect(("127.0.0.1", port))
            conn.request(method, path)
            resp = conn.getresponse()
            return HttpReply(resp.status, resp.read(), dict(resp.headers))
        finally:
            conn.close()

    def ready(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"container exited with {self.proc.returncode}:\n{self.log()}")
        try:
            return self.http(READINESS_PORT, "/healthz/ready").status == 200
        except (OSError, subprocess.CalledProcessError, ValueError):
            return False

    def wait_ready(self) -> None:
        wait_until(self.ready, f"container {self.name} to be ready")

    def config_dump(self) -> Any:
        return json.loads(self.http(ADMIN_PORT, "/config_dump").body)

    def metrics(self) -> str:
        return self.http(STATS_PORT, "/metrics").text

    def kill(self) -> int:
        """SIGKILL the daemon (as an OOM kill or a node problem would); its exit status."""
        subprocess.run(
            ["podman", "kill", "--signal", "KILL", self.name],
            capture_output=True,
            check=True,
            timeout=HANG_GUARD_S,
        )
        return self.proc.wait(timeout=HANG_GUARD_S)

    def remove(self) -> None:
        subprocess.run(
            ["podman", "rm", "--force", "--time", "0", self.name],
            capture_output=True,
            check=False,
            timeout=HANG_GUARD_S,
        )
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=HANG_GUARD_S)


@contextlib.contextmanager
def pod_container(
    docs: Sequence[dict[str, Any]], *, name: str, node: Node, log_dir: Path
) -> Iterator[PodContainer]:
    """Run the DaemonSet's container; removed (killed) on exit."""
    argv = podman_run_argv(docs, name=name, node=node)
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.log"
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(argv, stdout=log_file, stderr=subprocess.STDOUT)
    container = PodContainer(name, proc, log_path)
    try:
        yield container
    finally:
        container.remove()
