"""certs/gen.sh makes a plug-in directory that the local CA loads and signs with."""

# mypy: allow-untyped-defs, allow-incomplete-defs

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest

from ztunnel_py.identity.certificate import WorkloadCertificate
from ztunnel_py.identity.csr import generate_csr
from ztunnel_py.identity.localca import LocalCa
from ztunnel_py.identity.spiffe import Identity

GEN = Path(__file__).resolve().parents[3] / "certs" / "gen.sh"
ID = Identity("example.org", "default", "sleep")


def _gen(out: Path, *args: str) -> None:
    subprocess.run(["bash", str(GEN), str(out), *args], check=True, capture_output=True)


def _issue(ca: LocalCa, identity: Identity) -> tuple[WorkloadCertificate, list[str]]:
    req = generate_csr(identity)
    chain = ca.sign(
        req.csr_pem, identity, 3600, now=ca.ca_cert.not_valid_before_utc.timestamp() + 60
    )
    return WorkloadCertificate.from_ca_response(identity, req.private_key_pem, chain), chain


def test_generated_directory_is_a_usable_plug_in_ca(tmp_path):
    out = tmp_path / "ca"
    _gen(out, "--trust-domain", "example.org")
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(out / "ca-key.pem").st_mode) == 0o600
    ca = LocalCa.load_or_create(out, trust_domain="ignored", now=ca_time(out))
    assert ca.plugged_in
    cert, chain = _issue(ca, ID)
    assert len(chain) == 3  # leaf, intermediate, root
    leaf = tmp_path / "leaf.pem"
    leaf.write_bytes(cert.chain_pem)
    result = subprocess.run(
        [
            "openssl",
            "verify",
            "-CAfile",
            str(out / "root-cert.pem"),
            "-untrusted",
            str(leaf),
            str(leaf),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr


def test_two_cas_from_one_root_trust_each_other(tmp_path):
    _gen(tmp_path / "a")
    _gen(
        tmp_path / "b",
        "--root-cert",
        str(tmp_path / "a" / "root-cert.pem"),
        "--root-key",
        str(tmp_path / "a" / "root" / "root-key.pem"),
    )
    a = LocalCa.load_or_create(tmp_path / "a", trust_domain="x", now=ca_time(tmp_path / "a"))
    b = LocalCa.load_or_create(tmp_path / "b", trust_domain="x", now=ca_time(tmp_path / "b"))
    assert a.roots == b.roots
    cert_b, _ = _issue(b, ID)
    WorkloadCertificate.build(
        ID, cert_b.private_key_pem, cert_b.leaf, cert_b.intermediates, a.roots
    )


def test_refuses_to_overwrite(tmp_path):
    _gen(tmp_path / "ca")
    with pytest.raises(subprocess.CalledProcessError) as info:
        _gen(tmp_path / "ca")
    assert b"refusing to overwrite" in info.value.stderr


def ca_time(directory: Path) -> float:
    from cryptography import x509

    cert = x509.load_pem_x509_certificate((directory / "ca-cert.pem").read_bytes())
    return cert.not_valid_before_utc.timestamp() + 60
