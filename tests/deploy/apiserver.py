"""A throwaway etcd + kube-apiserver on loopback, from the Istio lab's binaries (issue 12).

``tools/lab/build.sh`` builds them into ``$ZTPY_LAB_CACHE`` (default
``/var/cache/ztunnel-py/lab``): ``kubernetes-<v>/{kube-apiserver,kubectl}`` and
``etcd-<v>/etcd``, each directory complete once it holds ``.built``. Authentication is one
static token in ``system:masters``; the serving certificate is the API server's own
self-signed one (kubectl skips verifying it: the server is ours, on loopback).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from ztunnel_py.testing.daemon import free_port
from ztunnel_py.testing.poll import HANG_GUARD_S, wait_until

TOKEN = "ztpy-deploy-admin"  # a throwaway token for a test server on loopback


@dataclass(frozen=True)
class Binaries:
    kube_apiserver: Path
    kubectl: Path
    etcd: Path


def lab_binaries() -> Binaries | None:
    """The newest complete builds in the lab's cache, or None when they are not there."""
    root = Path(os.environ.get("ZTPY_LAB_CACHE") or "/var/cache/ztunnel-py/lab")

    def built(pattern: str, name: str) -> Path | None:
        dirs = sorted(d for d in root.glob(pattern) if (d / ".built").exists())
        return dirs[-1] / name if dirs and (dirs[-1] / name).exists() else None

    apiserver, kubectl = built("kubernetes-*", "kube-apiserver"), built("kubernetes-*", "kubectl")
    etcd = built("etcd-*", "etcd")
    if apiserver is None or kubectl is None or etcd is None:
        return None
    return Binaries(apiserver, kubectl, etcd)


class ApiServer:
    def __init__(self, binaries: Binaries, work: Path) -> None:
        self.binaries = binaries
        self.work = work
        self.kubeconfig = work / "kubeconfig"
        self._procs: list[subprocess.Popen[bytes]] = []

    def kubectl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        out = subprocess.run(
            [str(self.binaries.kubectl), f"--kubeconfig={self.kubeconfig}", *args],
            capture_output=True,
            text=True,
            check=False,
            timeout=60,
        )
        if check and out.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed:\n{out.stderr}")
        return out

    def _spawn(self, name: str, argv: Sequence[str]) -> None:
        with open(self.work / f"{name}.log", "wb") as log:
            self._procs.append(subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT))

    def start(self) -> None:
        self.work.mkdir(parents=True, exist_ok=True)
        client, peer, port = free_port(), free_port(), free_port()
        self._spawn(
            "etcd",
            [str(self.binaries.etcd), "--name=deploy", f"--data-dir={self.work / 'etcd'}",
             f"--listen-client-urls=http://127.0.0.1:{client}",
             f"--advertise-client-urls=http://127.0.0.1:{client}",
             f"--listen-peer-urls=http://127.0.0.1:{peer}",
             f"--initial-advertise-peer-urls=http://127.0.0.1:{peer}",
             f"--initial-cluster=deploy=http://127.0.0.1:{peer}",
             "--unsafe-no-fsync", "--log-level=warn"],
        )  # fmt: skip
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        (self.work / "sa.key").write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        (self.work / "sa.pub").write_bytes(
            key.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )
        (self.work / "tokens.csv").write_text(f"{TOKEN},admin,admin,system:masters\n")
        self._spawn(
            "kube-apiserver",
            [str(self.binaries.kube_apiserver),
             f"--etcd-servers=http://127.0.0.1:{client}",
             "--bind-address=127.0.0.1", "--advertise-address=127.0.0.1",
             f"--secure-port={port}", f"--cert-dir={self.work / 'pki'}",
             f"--token-auth-file={self.work / 'tokens.csv'}",
             "--service-account-issuer=https://kubernetes.default.svc",
             f"--service-account-key-file={self.work / 'sa.pub'}",
             f"--service-account-signing-key-file={self.work / 'sa.key'}",
             "--service-cluster-ip-range=10.96.0.0/16", "--authorization-mode=RBAC",
             "--endpoint-reconciler-type=none", "--enable-priority-and-fairness=false", "--v=0"],
        )  # fmt: skip
        self.kubeconfig.write_text(
            "apiVersion: v1\nkind: Config\ncurrent-context: deploy\n"
            f"clusters: [{{name: deploy, cluster: {{server: 'https://127.0.0.1:{port}', "
            "insecure-skip-tls-verify: true}}]\n"
            f"users: [{{name: admin, user: {{token: {TOKEN}}}}}]\n"
            "contexts: [{name: deploy, context: {cluster: deploy, user: admin}}]\n"
        )

        def ready() -> bool:
            for proc in self._procs:
                if proc.poll() is not None:
                    logs = {p.name: p.read_text()[-3000:] for p in self.work.glob("*.log")}
                    raise RuntimeError(f"a control-plane process exited: {logs}")
            out = self.kubectl("get", "--raw", "/readyz", check=False)
            return out.returncode == 0 and out.stdout.strip() == "ok"

        wait_until(ready, "kube-apiserver /readyz", timeout=4 * HANG_GUARD_S)

    def stop(self) -> None:
        for proc in reversed(self._procs):
            if proc.poll() is None:
                proc.terminate()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=HANG_GUARD_S)
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        self._procs.clear()


@contextlib.contextmanager
def api_server(binaries: Binaries, work: Path) -> Iterator[ApiServer]:
    server = ApiServer(binaries, work)
    try:
        server.start()
        yield server
    finally:
        server.stop()
