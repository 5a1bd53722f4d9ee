"""ztunnel's own HBONE listener in a real daemon (root): the daemon runs in a network namespace
of its own (as ztunnel runs in its pod), told its pod by ``POD_NAME``, ``POD_NAMESPACE`` and
``SERVICE_ACCOUNT``; its workload is in the local config. An HBONE client holding a mesh
certificate (issued by the mesh's CA) CONNECTs to ``<pod IP>:15020`` through :15008 and reads
``/metrics``; a policy of the daemon's namespace that admits only Prometheus answers 401 to
another identity; the proxy's own ports answer 400.
"""

from __future__ import annotations

import json
import secrets
import socket
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h2.config
import h2.connection
import h2.events
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from ztunnel_py.identity.certificate import WorkloadCertificate
from ztunnel_py.identity.localca import CA_CERT_FILE, CA_KEY_FILE
from ztunnel_py.identity.spiffe import Identity
from ztunnel_py.identity.tls import client_context
from ztunnel_py.testing.daemon import Daemon, http, run_daemon
from ztunnel_py.testing.netns import Netns, NetnsPool
from ztunnel_py.testing.pki import CertificateAuthority
from ztunnel_py.testing.poll import eventually

pytestmark = [pytest.mark.root]

POD_IP = "10.77.0.2"
NAMESPACE, NAME, SA = "istio-system", "ztunnel-abcde", "ztunnel"
PROMETHEUS = Identity("cluster.local", "monitoring", "prometheus")
OTHER = Identity("cluster.local", "default", "curious")
STATS = 15020  # ztunnel's metrics port; free in a namespace of our own


def local_config(policies: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "workloads": [
            {
                "uid": f"Kubernetes//Pod/{NAMESPACE}/{NAME}",
                "name": NAME,
                "namespace": NAMESPACE,
                "serviceAccount": SA,
                "workloadIps": [POD_IP],
                "protocol": "HBONE",
                "node": "node-a",
            }
        ],
        "policies": policies,
    }


@dataclass
class SelfDaemon:
    ns: Netns
    daemon: Daemon
    config_path: Path
    ca_dir: Path

    def get(self, path: str) -> Any:
        return self.ns.run(lambda: http(f"{self.daemon.admin}{path}"))

    def dump(self) -> Any:
        return json.loads(self.get("/config_dump").body)

    def write_config(self, policies: list[dict[str, Any]]) -> None:
        tmp = self.config_path.with_suffix(".tmp")
        tmp.write_text(yaml.safe_dump(local_config(policies)))
        tmp.replace(self.config_path)

    def certificate(self, identity: Identity) -> WorkloadCertificate:
        """A mesh certificate for ``identity``, issued by the daemon's CA."""
        ca = CertificateAuthority(
            cert=x509.load_pem_x509_certificate((self.ca_dir / CA_CERT_FILE).read_bytes()),
            key=serialization.load_pem_private_key(  # type: ignore[arg-type]
                (self.ca_dir / CA_KEY_FILE).read_bytes(), None
            ),
        )
        issued = ca.issue_workload(str(identity))
        return WorkloadCertificate.from_ca_response(
            identity, issued.key_pem, [issued.cert_pem.decode(), ca.root_pem.decode()]
        )

    def hbone(self, identity: Identity, authority: str, payload: bytes) -> tuple[int | None, bytes]:
        """CONNECT to ``authority`` over mTLS to :15008 as ``identity``; send ``payload``,
        return the status and everything the stream carried back."""
        ctx = client_context(self.certificate(identity))
        return self.ns.run(lambda: _hbone_exchange(ctx, authority, payload))


def _hbone_exchange(
    ctx: ssl.SSLContext, authority: str, payload: bytes
) -> tuple[int | None, bytes]:
    raw = socket.create_connection((POD_IP, 15008), timeout=10)
    with ctx.wrap_socket(raw, server_hostname=None) as tls:
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        conn.initiate_connection()
        sid = conn.get_next_available_stream_id()
        conn.send_headers(sid, [(":method", "CONNECT"), (":authority", authority)])
        tls.sendall(conn.data_to_send())
        status: int | None = None
        body = b""
        done = False
        while not done:
            data = tls.recv(65536)
            if not data:
                break
            for ev in conn.receive_data(data):
                if isinstance(ev, h2.events.ResponseReceived):
                    status = int(dict(ev.headers)[b":status"])
                    if status != 200:
                        done = True
                    else:
                        conn.send_data(sid, payload)
                elif isinstance(ev, h2.events.DataReceived):
                    body += ev.data
                    conn.acknowledge_received_data(ev.flow_controlled_length, sid)
                elif isinstance(ev, h2.events.StreamEnded | h2.events.StreamReset):
                    done = True
            tls.sendall(conn.data_to_send())
        return status, body


@pytest.fixture(scope="module")
def bed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SelfDaemon]:
    work = Path(tmp_path_factory.mktemp("self"))
    config_path = work / "mesh.yaml"
    config_path.write_text(yaml.safe_dump(local_config([])))
    with NetnsPool(tag=f"crl{secrets.token_hex(2)}") as pool:
        ns = pool.netns("self")
        ns.sh("ip", "addr", "add", f"{POD_IP}/32", "dev", "lo")
        env = {
            "LOCAL_XDS_PATH": str(config_path),
            "LOCAL_CA_DIR": str(work / "ca"),
            "NODE_NAME": "node-a",
            "INPOD_UDS": str(work / "no-agent.sock"),
            "REDIRECT_MODE": "iptables",
            "STATS_PORT": str(STATS),
            "POD_NAME": NAME,
            "POD_NAMESPACE": NAMESPACE,
            "SERVICE_ACCOUNT": SA,
        }
        with run_daemon(env, log_dir=work / "logs", netns=ns.name, wait="none") as daemon:
            bed = SelfDaemon(ns, daemon, config_path, work / "ca")

            def listening() -> dict[str, Any]:
                try:
                    listener: dict[str, Any] = bed.dump()["dataPlane"]["selfListener"]
                except OSError as e:  # the admin port is not up yet
                    raise AssertionError(e) from None
                assert listener["listening"] == [f"{POD_IP}:15008"], listener
                return listener

            try:
                listener = eventually(listening)
            except (AssertionError, OSError) as e:
                raise AssertionError(f"{e}\n{daemon.log()[-3000:]}") from None
            assert listener["identity"] == f"spiffe://cluster.local/ns/{NAMESPACE}/sa/{SA}"
            yield bed


GET_METRICS = b"GET /metrics HTTP/1.1\r\nHost: ztunnel\r\nConnection: close\r\n\r\n"


def test_mesh_client_reads_the_daemon_s_metrics_over_hbone(bed: SelfDaemon) -> None:
    status, body = bed.hbone(PROMETHEUS, f"{POD_IP}:{STATS}", GET_METRICS)
    assert status == 200
    assert body.startswith(b"HTTP/1.1 200"), body[:200]
    assert b"istio_build" in body


def test_the_proxy_s_own_ports_are_refused(bed: SelfDaemon) -> None:
    for port in (15001, 15006, 15008):
        status, _ = bed.hbone(PROMETHEUS, f"{POD_IP}:{port}", b"")
        assert status == 400, port


def test_a_policy_of_the_daemon_s_namespace_applies(bed: SelfDaemon) -> None:
    only_prometheus = {
        "name": "only-prometheus",
        "namespace": NAMESPACE,
        "scope": "Namespace",
        "action": "Allow",
        "rules": [[[{"principals": [str(PROMETHEUS).removeprefix("spiffe://")]}]]],
    }
    bed.write_config([only_prometheus])
    try:
        eventually(lambda: _policy_loaded(bed))
        denied, _ = bed.hbone(OTHER, f"{POD_IP}:{STATS}", GET_METRICS)
        assert denied == 401
        status, body = bed.hbone(PROMETHEUS, f"{POD_IP}:{STATS}", GET_METRICS)
        assert status == 200 and b"istio_build" in body
    finally:
        bed.write_config([])


def _policy_loaded(bed: SelfDaemon) -> None:
    policies = bed.dump()["policies"]
    assert [p["name"] for p in policies] == ["only-prometheus"], policies
