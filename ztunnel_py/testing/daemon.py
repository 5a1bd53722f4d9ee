"""Run the real ``ztunnel-py`` process for tests and tools, on free ports, and talk to it."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@dataclass
class HttpReply:
    status: int
    body: bytes
    headers: Mapping[str, str] = field(default_factory=dict)

    @property
    def text(self) -> str:
        return self.body.decode()

    def json(self) -> Any:
        return json.loads(self.body)


def http(
    url: str, *, method: str = "GET", headers: Mapping[str, str] | None = None, timeout: float = 5
) -> HttpReply:
    req = urllib.request.Request(url, method=method, headers=dict(headers or {}))  # noqa: S310
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310 (test URLs)
            return HttpReply(resp.status, resp.read(), dict(resp.headers))
    except urllib.error.HTTPError as e:
        return HttpReply(e.code, e.read(), dict(e.headers))


@dataclass
class Daemon:
    """A ``ztunnel-py run`` child process with its admin/metrics/readiness ports."""

    proc: subprocess.Popen[bytes]
    admin_port: int
    stats_port: int
    readiness_port: int
    log_path: Path

    @property
    def admin(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    @property
    def stats(self) -> str:
        return f"http://127.0.0.1:{self.stats_port}"

    @property
    def ready_url(self) -> str:
        return f"http://127.0.0.1:{self.readiness_port}/healthz/ready"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def config_dump(self) -> Any:
        return http(f"{self.admin}/config_dump").json()

    def wait_listening(self, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ztunnel-py exited with {self.proc.returncode}:\n{self.log()}")
            try:
                http(self.ready_url, timeout=1)
                return
            except (urllib.error.URLError, OSError):
                time.sleep(0.05)
        raise TimeoutError(f"ztunnel-py did not open its readiness port:\n{self.log()}")

    def wait_ready(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ztunnel-py exited with {self.proc.returncode}:\n{self.log()}")
            with contextlib.suppress(urllib.error.URLError, OSError):
                last = http(self.ready_url, timeout=1)
                if last.status == 200:
                    return
            time.sleep(0.05)
        raise TimeoutError(f"not ready: {last.text if last else 'no answer'}\n{self.log()}")

    def signal(self, signum: int = signal.SIGTERM) -> None:
        self.proc.send_signal(signum)

    def wait(self, timeout: float = 30) -> int:
        return self.proc.wait(timeout=timeout)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


@contextlib.contextmanager
def run_daemon(
    env: Mapping[str, str],
    *,
    log_dir: Path,
    argv: Sequence[str] = ("run",),
    netns: str | None = None,
    wait: str = "listening",
) -> Iterator[Daemon]:
    """Start the daemon with ``env`` on top of a minimal environment; kill it on exit."""
    admin, stats, ready = free_port(), free_port(), free_port()
    full_env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": os.environ.get("HOME", "/root"),
        "PYTHONPATH": os.environ.get("PYTHONPATH", ""),
        "ADMIN_PORT": str(admin),
        "STATS_PORT": str(stats),
        "READINESS_PORT": str(ready),
        **env,
    }
    admin = int(full_env["ADMIN_PORT"])
    stats = int(full_env["STATS_PORT"])
    ready = int(full_env["READINESS_PORT"])
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"ztunnel-py-{admin}.log"
    cmd = [sys.executable, "-m", "ztunnel_py", *argv]
    if netns:
        cmd = ["ip", "netns", "exec", netns, *cmd]
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(cmd, env=full_env, stdout=log_file, stderr=subprocess.STDOUT)
    daemon = Daemon(proc, admin, stats, ready, log_path)
    try:
        if wait == "listening":
            daemon.wait_listening()
        elif wait == "ready":
            daemon.wait_ready()
        yield daemon
    finally:
        daemon.stop()
