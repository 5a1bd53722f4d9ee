"""``CRL_PATH`` against real daemons (root): two nodes whose daemons watch one CRL file, signed
by the mesh's CA.

- a CRL written while two clients stream to one server closes the stream of the client it
  revokes (access log ``connection closed: peer certificate revoked by CRL``, ``CERT_REVOKED``
  in ``istio_tcp_connections_closed_total``) and leaves the other one running;
- the revoked client's new connections are refused at the handshake, counted in the server
  node's ``istio_crl_policy_rejections_total{reporter="destination"}``;
- the same with two data-plane worker processes per daemon;
- a CRL file that does not parse is logged naming the file, and the last good CRL stays in
  force: the daemons serve on.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from tests.netns.e2e.support import (
    Scrape,
    access_records,
    finish_stream,
    log_mark,
    log_records,
    mesh_tag,
    only_one,
    receiving_from,
    start_stream,
)
from tools.testbed import cgroup2_mount
from tools.testbed.mesh import Mesh, MeshOptions
from ztunnel_py.identity.localca import CA_CERT_FILE, CA_KEY_FILE
from ztunnel_py.proxy.revocation import CERT_REVOKED_ERROR
from ztunnel_py.testing.daemon import Daemon
from ztunnel_py.testing.poll import HANG_GUARD_S, wait_until
from ztunnel_py.testing.privileged import require

pytestmark = [pytest.mark.root]

SERVER = "pod-1-1"
KEPT, CUT = "pod-0-0", "pod-0-1"  # clients on node-0, service accounts app-0 and app-1
ECHO = 9000
CLOSED = "istio_tcp_connections_closed_total"
REJECTIONS = "istio_crl_policy_rejections_total"


@pytest.fixture(scope="module")
def crl_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = Path(tmp_path_factory.mktemp("crl")) / "ca-crl.pem"
    path.write_bytes(b"")  # empty: nothing revoked
    return path


@pytest.fixture(scope="module", params=["1", "2"], ids=["one-process", "two-workers"])
def mesh(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, crl_path: Path
) -> Iterator[Mesh]:
    require(cgroup2_mount() is not None, "a cgroup v2 mount (testbed pods live in cgroups)")
    options = MeshOptions(
        tag=mesh_tag("crl", "iptables"),
        redirect="iptables",
        # With worker processes each worker checks its own handshakes and connections.
        env={
            "LOG_FORMAT": "json",
            "CRL_PATH": str(crl_path),
            "ZTUNNEL_WORKER_THREADS": request.param,
        },
    )
    shared = Mesh(options, Path(tmp_path_factory.mktemp(options.tag)))
    try:
        shared.up()
        yield shared
    finally:
        shared.down()


def leaf_serial(daemon: Daemon, identity: str) -> int:
    for entry in daemon.config_dump()["certificates"]:
        if entry["identity"] == identity and entry["certChain"]:
            return int(entry["certChain"][0]["serialNumber"])
    raise AssertionError(f"{identity} has no certificate on this daemon")


def write_crl(mesh: Mesh, path: Path, serials: list[int]) -> None:
    """A CRL signed by the mesh's CA (the daemons' LOCAL_CA_DIR), written atomically."""
    ca_dir = mesh.work_dir / "ca"
    ca_cert = x509.load_pem_x509_certificate((ca_dir / CA_CERT_FILE).read_bytes())
    ca_key = serialization.load_pem_private_key((ca_dir / CA_KEY_FILE).read_bytes(), None)
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_cert.subject)
        .last_update(now)
        .next_update(now + datetime.timedelta(days=365))
    )
    for serial in serials:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(now).build()
        )
    crl = builder.sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(crl.public_bytes(serialization.Encoding.PEM))
    tmp.replace(path)


def test_revocation_closes_the_live_stream_refuses_reconnects_and_survives_a_bad_file(
    mesh: Mesh, crl_path: Path
) -> None:
    src_node, dst_node = mesh.daemons["node-0"], mesh.daemons["node-1"]
    kept_pod, cut_pod, server = mesh.pod(KEPT), mesh.pod(CUT), mesh.pod(SERVER)
    streams = []
    try:
        start = Scrape(dst_node)
        kept = start_stream(mesh, kept_pod.name, server.ip, ECHO)
        streams.append(kept)
        cut = start_stream(mesh, cut_pod.name, server.ip, ECHO)
        streams.append(cut)

        wait_until(
            receiving_from(dst_node, start, [kept_pod.identity, cut_pod.identity]),
            "both streams to reach the server's app",
        )
        marks = log_mark(src_node), log_mark(dst_node)
        before = Scrape(dst_node)

        write_crl(mesh, crl_path, [leaf_serial(src_node, cut_pod.identity)])

        cut.wait(timeout=HANG_GUARD_S)  # ended by the server's daemon, its stdin still open
        ended = finish_stream(cut)
        assert ended["result"] in {"reset", "closed"}, ended
        closed = only_one(
            lambda: access_records(
                dst_node, marks[1], direction="inbound", src_identity=cut_pod.identity
            ),
            "the server node's access log of the revoked stream",
        )
        assert closed["error"] == CERT_REVOKED_ERROR
        assert closed["bytes_recv"] > 0
        revoked = {"reporter": "destination", "response_flags": "CERT_REVOKED"}
        after = Scrape(dst_node)
        assert (
            after.total(CLOSED, **revoked, source_principal=cut_pod.identity)
            - before.total(CLOSED, **revoked, source_principal=cut_pod.identity)
            == 1
        )
        assert any(
            "revoked by CRL update" in r.get("message", "") for r in log_records(dst_node, marks[1])
        )

        # New connections of the revoked client are refused at the handshake.
        again = mesh.client(cut_pod.name, "echo", server.ip, ECHO, "--bytes", "4096")
        assert again["result"] != "ok", again
        assert again["received"] == 0
        assert Scrape(dst_node).total(REJECTIONS, reporter="destination") >= 1

        # A file that does not parse: an error naming it, the last good CRL stays in force.
        bad_mark = log_mark(dst_node)
        crl_path.write_bytes(b"-----BEGIN X509 CRL-----\nnot base64\n-----END X509 CRL-----\n")
        wait_until(
            lambda: any(
                f"CRL file {crl_path}: CRL 1 (PEM) cannot be parsed" in r.get("message", "")
                for r in log_records(dst_node, bad_mark)
            ),
            "the server node to refuse the bad CRL file",
        )
        still = mesh.client(cut_pod.name, "echo", server.ip, ECHO, "--bytes", "4096")
        assert still["result"] != "ok", still
        fresh = mesh.client(kept_pod.name, "echo", server.ip, ECHO, "--bytes", "4096")
        assert fresh["result"] == "ok", fresh

        # The other client's stream ran on and ends cleanly.
        assert kept.poll() is None
        result = finish_stream(kept)
        assert result["result"] == "ok", result
        assert result["sent"] == result["received"] > 0
    finally:
        crl_path.write_bytes(b"")
        for proc in streams:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
