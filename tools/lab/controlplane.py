"""The lab's real control plane on this machine: etcd, kube-apiserver and istiod (root not needed).

No container runtime, no kubelet, no controller-manager: the API server stores what the testbed
registers (tools/lab/cluster.py) and istiod, run outside the cluster with a kubeconfig as an
"external istiod" is, watches it. Everything listens on 127.0.0.1 on free ports, so labs of
different sessions never collide; the daemons reach istiod at ``https://127.0.0.1:<port>`` and
check its certificate for ``istiod.istio-system.svc`` (ztunnel's ``ALT_XDS_HOSTNAME``).

- etcd: one member, data in the work dir.
- kube-apiserver: our serving certificate; a static bearer token (``system:masters``) for our
  tools and istiod; a service-account signing key and issuer, so the TokenRequest API issues
  bound tokens and TokenReview (istiod's authentication of ztunnel) works; RBAC.
- istio's CRDs from the same istio module as istiod, applied with kubectl.
- istiod (``pilot-discovery discovery``): ambient on, its own CA (``istio-ca-secret``) which it
  publishes as the ``istio-ca-root-cert`` ConfigMap in every namespace, ztunnel trusted for
  impersonation (``CA_TRUSTED_NODE_ACCOUNTS=istio-system/ztunnel``), as the ambient profile of
  the chart sets it up.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tools.lab.binaries import LabBinaries, find_binaries
from ztunnel_py.testing.daemon import free_port
from ztunnel_py.testing.pki import CertificateAuthority, key_to_pem, new_private_key

ISTIO_NAMESPACE = "istio-system"
ISTIOD_HOST = "istiod.istio-system.svc"
CLUSTER_ID = "Kubernetes"
SERVICE_CIDR = "10.96.0.0/24"  # the testbed's service VIPs live here
SA_ISSUER = "https://kubernetes.default.svc.cluster.local"
ROOT_CERT_CONFIGMAP = "istio-ca-root-cert"
_START_TIMEOUT_S = 180.0  # a cold API server on two busy cores takes a while


class LabError(RuntimeError):
    """The lab could not start or stop; the message names the component and its log."""


@dataclass
class _Proc:
    name: str
    argv: list[str]
    env: dict[str, str]
    log_path: Path
    popen: subprocess.Popen[bytes] | None = None

    def start(self, cwd: Path) -> None:
        with open(self.log_path, "ab") as log:
            self.popen = subprocess.Popen(
                self.argv,
                env=self.env,
                cwd=cwd,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> None:
        if self.popen is None:
            return
        if self.popen.poll() is None:
            self.popen.send_signal(sig)
            try:
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout=10)
        self.popen = None

    def log_tail(self, chars: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except FileNotFoundError:
            return ""


@dataclass
class ControlPlane:
    """etcd + kube-apiserver + istiod for one lab; ``start()``/``stop()``, or a context manager."""

    work_dir: Path
    binaries: LabBinaries = field(default_factory=find_binaries)
    istiod_env: Mapping[str, str] = field(default_factory=dict)  # extra istiod settings
    token: str = field(default_factory=lambda: secrets.token_hex(16))
    ports: dict[str, int] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)  # seconds each start step took
    _procs: dict[str, _Proc] = field(default_factory=dict)

    # ------------------------------------------------------------------ addresses

    @property
    def apiserver_url(self) -> str:
        return f"https://127.0.0.1:{self.ports['apiserver']}"

    @property
    def istiod_address(self) -> str:
        """Where ztunnel's XDS_ADDRESS and CA_ADDRESS point (istiod's :15012)."""
        return f"https://127.0.0.1:{self.ports['istiod_grpc_tls']}"

    @property
    def istiod_debug_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['istiod_http']}"

    @property
    def kubeconfig(self) -> Path:
        return self.work_dir / "kubeconfig"

    @property
    def apiserver_ca(self) -> Path:
        return self.work_dir / "pki" / "apiserver-ca.crt"

    def log_path(self, name: str) -> Path:
        return self.work_dir / "logs" / f"{name}.log"

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        self.start_kubernetes()
        try:
            self._timed("crds", self._apply_crds)
            self._timed("istiod", self.start_istiod)
        except BaseException:
            self.stop()
            raise

    def start_kubernetes(self) -> None:
        """etcd and the API server only (no CRDs, no istiod): enough to validate manifests."""
        try:
            self._timed("etcd", self._start_etcd)
            self._timed("kube-apiserver", self._start_apiserver)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        for name in ("istiod", "kube-apiserver", "etcd"):
            proc = self._procs.pop(name, None)
            if proc is not None:
                proc.stop()

    def __enter__(self) -> ControlPlane:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _timed(self, what: str, step: Callable[[], None]) -> None:
        start = time.monotonic()
        step()
        self.timings[what] = round(time.monotonic() - start, 1)

    def _spawn(self, name: str, argv: Sequence[str], env: Mapping[str, str] | None = None) -> _Proc:
        (self.work_dir / "logs").mkdir(parents=True, exist_ok=True)
        base = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(self.work_dir)}
        proc = _Proc(name, list(argv), {**base, **(env or {})}, self.log_path(name))
        proc.start(self.work_dir)
        self._procs[name] = proc
        return proc

    def _wait(self, proc: _Proc, what: str, check: Callable[[], bool]) -> None:
        deadline = time.monotonic() + _START_TIMEOUT_S
        while True:
            if not proc.alive():
                raise LabError(
                    f"{proc.name} exited while starting; {proc.log_path}:\n{proc.log_tail()}"
                )
            with contextlib.suppress(OSError, urllib.error.URLError, ValueError):
                if check():
                    return
            if time.monotonic() > deadline:
                raise LabError(
                    f"{proc.name}: gave up waiting for {what}; {proc.log_path}:\n{proc.log_tail()}"
                )
            time.sleep(0.2)

    # ------------------------------------------------------------------ etcd

    def _start_etcd(self) -> None:
        client, peer = free_port(), free_port()
        self.ports["etcd"] = client
        data = self.work_dir / "etcd"
        proc = self._spawn(
            "etcd",
            [
                str(self.binaries.etcd),
                "--name=lab",
                f"--data-dir={data}",
                f"--listen-client-urls=http://127.0.0.1:{client}",
                f"--advertise-client-urls=http://127.0.0.1:{client}",
                f"--listen-peer-urls=http://127.0.0.1:{peer}",
                f"--initial-advertise-peer-urls=http://127.0.0.1:{peer}",
                f"--initial-cluster=lab=http://127.0.0.1:{peer}",
                "--unsafe-no-fsync",  # a throwaway store: durability buys nothing here
                "--log-level=warn",
            ],
        )
        self._wait(
            proc,
            "etcd /health",
            lambda: _http_json(f"http://127.0.0.1:{client}/health")["health"] == "true",
        )

    # ------------------------------------------------------------------ kube-apiserver

    def _write_pki(self) -> dict[str, Path]:
        pki = self.work_dir / "pki"
        pki.mkdir(parents=True, exist_ok=True)
        ca = CertificateAuthority.create("ztunnel-py lab apiserver CA")
        serving = ca.issue_server(
            dns_names=["localhost", "kubernetes", "kubernetes.default.svc"],
            ip_addresses=["127.0.0.1"],
        )
        cert, key = serving.write(pki, "apiserver")
        self.apiserver_ca.write_bytes(ca.cert_pem)
        sa_key = new_private_key("ec")
        sa_key_path = pki / "sa.key"
        sa_key_path.write_bytes(key_to_pem(sa_key))
        sa_pub_path = pki / "sa.pub"
        from cryptography.hazmat.primitives import serialization

        sa_pub_path.write_bytes(
            sa_key.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )
        tokens = pki / "tokens.csv"
        tokens.write_text(f'{self.token},lab-admin,lab-admin,"system:masters"\n')
        return {
            "cert": cert,
            "key": key,
            "sa_key": sa_key_path,
            "sa_pub": sa_pub_path,
            "tokens": tokens,
        }

    def _write_kubeconfig(self) -> None:
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "lab",
                    "cluster": {
                        "server": self.apiserver_url,
                        "certificate-authority": str(self.apiserver_ca),
                    },
                }
            ],
            "users": [{"name": "lab-admin", "user": {"token": self.token}}],
            "contexts": [{"name": "lab", "context": {"cluster": "lab", "user": "lab-admin"}}],
            "current-context": "lab",
        }
        self.kubeconfig.write_text(yaml.safe_dump(config))
        self.kubeconfig.chmod(0o600)

    def _start_apiserver(self) -> None:
        files = self._write_pki()
        port = free_port()
        self.ports["apiserver"] = port
        self._write_kubeconfig()
        proc = self._spawn(
            "kube-apiserver",
            [
                str(self.binaries.kube_apiserver),
                f"--etcd-servers=http://127.0.0.1:{self.ports['etcd']}",
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                f"--secure-port={port}",
                f"--tls-cert-file={files['cert']}",
                f"--tls-private-key-file={files['key']}",
                f"--token-auth-file={files['tokens']}",
                f"--service-account-issuer={SA_ISSUER}",
                f"--service-account-key-file={files['sa_pub']}",
                f"--service-account-signing-key-file={files['sa_key']}",
                f"--api-audiences={SA_ISSUER}",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                "--authorization-mode=RBAC",
                # No kubelet or controller-manager: nothing would serve the kubernetes Service's
                # endpoint (127.0.0.1 is not a valid endpoint address anyway).
                "--endpoint-reconciler-type=none",
                "--enable-priority-and-fairness=false",
                f"--cert-dir={self.work_dir / 'pki'}",
                "--v=0",
            ],
        )
        context = ssl.create_default_context(cafile=str(self.apiserver_ca))
        self._wait(
            proc,
            "the API server's /readyz",
            lambda: (
                _http_text(f"{self.apiserver_url}/readyz", context=context, token=self.token)
                == "ok"
            ),
        )

    def kubectl_result(
        self, *args: str, input_text: str | None = None, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        """Run the lab's kubectl against this API server, whatever its exit status."""
        return subprocess.run(
            [str(self.binaries.kubectl), f"--kubeconfig={self.kubeconfig}", *args],
            input=input_text,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def kubectl(self, *args: str, input_text: str | None = None, timeout: float = 120) -> str:
        """Run the lab's kubectl against this API server; its stdout (LabError on failure)."""
        proc = self.kubectl_result(*args, input_text=input_text, timeout=timeout)
        if proc.returncode != 0:
            raise LabError(
                f"kubectl {' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}"
            )
        return proc.stdout

    def _apply_crds(self) -> None:
        self.kubectl("apply", "--server-side", "-f", str(self.binaries.istio_crds))
        self.kubectl("wait", "--for=condition=Established", "crd", "--all", "--timeout=120s")
        self.kubectl("create", "namespace", ISTIO_NAMESPACE)

    # ------------------------------------------------------------------ istiod

    def start_istiod(self) -> None:
        """Start istiod (again after ``stop_istiod``: same ports, same CA secret in the cluster)."""
        if not self.ports.get("istiod_grpc_tls"):
            for name in (
                "istiod_grpc_tls",
                "istiod_grpc",
                "istiod_http",
                "istiod_monitoring",
                "istiod_webhook",
            ):
                self.ports[name] = free_port()
        mesh = self.work_dir / "mesh.yaml"
        mesh.write_text(
            yaml.safe_dump(
                {
                    "trustDomain": "cluster.local",
                    "defaultConfig": {"proxyMetadata": {"ISTIO_META_ENABLE_HBONE": "true"}},
                }
            )
        )
        env = {
            "KUBECONFIG": str(self.kubeconfig),
            "POD_NAME": "istiod-lab",
            "POD_NAMESPACE": ISTIO_NAMESPACE,
            "SERVICE_ACCOUNT": "istiod",
            "REVISION": "default",
            "CLUSTER_ID": CLUSTER_ID,
            "PILOT_CERT_PROVIDER": "istiod",
            "PILOT_ENABLE_AMBIENT": "true",  # the ambient profile's only pilot setting
            "CA_TRUSTED_NODE_ACCOUNTS": f"{ISTIO_NAMESPACE}/ztunnel",
            "ENABLE_CA_SERVER": "true",
            # No webhooks exist here (no chart installed them) and nothing could call them.
            "INJECTION_WEBHOOK_CONFIG_NAME": "",
            "VALIDATION_WEBHOOK_CONFIG_NAME": "",
            "PILOT_ENABLE_ANALYSIS": "false",
            "GOMAXPROCS": "2",
            **self.istiod_env,
        }
        proc = self._spawn(
            "istiod",
            [
                str(self.binaries.pilot_discovery),
                "discovery",
                f"--kubeconfig={self.kubeconfig}",
                f"--meshConfig={mesh}",
                "--domain=cluster.local",
                f"--clusterID={CLUSTER_ID}",
                f"--secureGRPCAddr=127.0.0.1:{self.ports['istiod_grpc_tls']}",
                f"--grpcAddr=127.0.0.1:{self.ports['istiod_grpc']}",
                f"--httpAddr=127.0.0.1:{self.ports['istiod_http']}",
                f"--monitoringAddr=127.0.0.1:{self.ports['istiod_monitoring']}",
                f"--httpsAddr=127.0.0.1:{self.ports['istiod_webhook']}",
                "--keepaliveMaxServerConnectionAge=30m",
                "--log_output_level=default:info",
            ],
            env,
        )
        self._wait(
            proc, "istiod /ready", lambda: _http_status(f"{self.istiod_debug_url}/ready") == 200
        )

    def stop_istiod(self, sig: int = signal.SIGKILL) -> None:
        """Kill istiod (SIGKILL by default: a crash, not a drain)."""
        proc = self._procs.pop("istiod")
        proc.stop(sig)

    @property
    def istiod_running(self) -> bool:
        proc = self._procs.get("istiod")
        return proc is not None and proc.alive()

    def istiod_root_cert(self, namespace: str = ISTIO_NAMESPACE) -> str:
        """istiod's root certificate as it publishes it (the ``istio-ca-root-cert`` ConfigMap)."""
        out = self.kubectl("get", "configmap", ROOT_CERT_CONFIGMAP, "-n", namespace, "-o", "json")
        return str(json.loads(out)["data"]["root-cert.pem"])


def _request(url: str, *, context: ssl.SSLContext | None = None, token: str | None = None) -> Any:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    req = urllib.request.Request(url, headers=headers)
    return urllib.request.urlopen(req, timeout=5, context=context)


def _http_text(url: str, **kw: Any) -> str:
    with _request(url, **kw) as resp:
        return str(resp.read().decode())


def _http_json(url: str) -> Any:
    return json.loads(_http_text(url))


def _http_status(url: str) -> int:
    try:
        with _request(url) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as e:
        return int(e.code)
