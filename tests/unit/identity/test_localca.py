"""The embedded local CA: state directory handling, plugged-in CAs, istiod's workload profile."""

# mypy: allow-untyped-defs, allow-incomplete-defs

from __future__ import annotations

import datetime
import os
import stat
import threading
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from ztunnel_py.identity.certificate import WorkloadCertificate
from ztunnel_py.identity.csr import generate_csr
from ztunnel_py.identity.errors import LocalCaError
from ztunnel_py.identity.localca import (
    CA_CERT_FILE,
    CA_KEY_FILE,
    CERT_CHAIN_FILE,
    ROOT_CERT_FILE,
    LocalCa,
)
from ztunnel_py.identity.spiffe import Identity
from ztunnel_py.testing.pki import CertificateAuthority

ID = Identity("cluster.local", "default", "sleep")
NOW = 1_900_000_000.0  # 2030-03-17


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def _issue(ca: LocalCa, ttl_s: float = 3600.0, now: float = NOW) -> WorkloadCertificate:
    req = generate_csr(ID)
    chain = ca.sign(req.csr_pem, ID, ttl_s, now=now)
    return WorkloadCertificate.from_ca_response(ID, req.private_key_pem, chain)


def test_first_start_creates_private_root(tmp_path):
    state = tmp_path / "var" / "ca"
    ca = LocalCa.load_or_create(state, trust_domain="example.org", now=NOW)
    assert _mode(state) == 0o700
    assert _mode(state / CA_KEY_FILE) == 0o600
    assert (state / ROOT_CERT_FILE).read_bytes() == (state / CA_CERT_FILE).read_bytes()
    assert not ca.plugged_in
    root = ca.roots[0]
    assert root.subject.rfc4514_string() == "CN=ztunnel-py local CA,O=example.org"
    assert root.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


def test_restart_keeps_the_same_root(tmp_path):
    first = LocalCa.load_or_create(tmp_path / "ca", trust_domain="cluster.local", now=NOW)
    second = LocalCa.load_or_create(tmp_path / "ca", trust_domain="cluster.local", now=NOW + 60)
    assert second.roots == first.roots
    assert second.root_pem == first.root_pem
    # and a certificate from the first run verifies against the second run's roots
    cert = _issue(first)
    WorkloadCertificate.build(ID, cert.private_key_pem, cert.leaf, [], second.roots)


def test_refuses_directory_readable_by_others(tmp_path):
    state = tmp_path / "ca"
    state.mkdir(mode=0o700)
    state.chmod(0o755)
    with pytest.raises(LocalCaError) as info:
        LocalCa.load_or_create(state, trust_domain="cluster.local", now=NOW)
    msg = str(info.value)
    assert str(state) in msg
    assert "0755" in msg
    assert f"chmod 700 {state}" in msg
    assert not (state / CA_KEY_FILE).exists()


def test_refuses_key_readable_by_group(tmp_path):
    state = tmp_path / "ca"
    LocalCa.load_or_create(state, trust_domain="cluster.local", now=NOW)
    (state / CA_KEY_FILE).chmod(0o640)
    with pytest.raises(LocalCaError) as info:
        LocalCa.load_or_create(state, trust_domain="cluster.local", now=NOW)
    msg = str(info.value)
    assert str(state / CA_KEY_FILE) in msg
    assert "0640" in msg
    assert f"chmod 600 {state / CA_KEY_FILE}" in msg


def test_refuses_a_file_in_place_of_the_directory(tmp_path):
    (tmp_path / "ca").write_text("")
    with pytest.raises(LocalCaError, match="not a directory"):
        LocalCa.load_or_create(tmp_path / "ca", trust_domain="cluster.local", now=NOW)


def _plug_in(state, intermediate: CertificateAuthority, root: CertificateAuthority, chain=True):
    state.mkdir(mode=0o700)
    state.chmod(0o700)
    (state / CA_CERT_FILE).write_bytes(intermediate.cert_pem)
    key = state / CA_KEY_FILE
    key.write_bytes(intermediate.key_pem)
    key.chmod(0o600)
    (state / ROOT_CERT_FILE).write_bytes(root.cert_pem)
    if chain:
        (state / CERT_CHAIN_FILE).write_bytes(intermediate.cert_pem + root.cert_pem)


def test_plugged_in_intermediate(tmp_path):
    root = CertificateAuthority.create(common_name="corp root")
    intermediate = root.intermediate(common_name="cluster1 intermediate")
    _plug_in(tmp_path / "ca", intermediate, root)
    ca = LocalCa.load_or_create(tmp_path / "ca", trust_domain="cluster.local", now=NOW)
    assert ca.plugged_in
    assert ca.roots == (root.cert,)
    req = generate_csr(ID)
    chain = ca.sign(req.csr_pem, ID, 3600, now=NOW)
    # istiod's layout: leaf, the signing CA, roots last; the root is not repeated in the middle
    assert len(chain) == 3
    assert chain[1].encode() == intermediate.cert_pem
    assert chain[2].encode() == root.cert_pem
    cert = WorkloadCertificate.from_ca_response(ID, req.private_key_pem, chain)
    assert cert.intermediates == (intermediate.cert,)


def test_plugged_in_without_cert_chain(tmp_path):
    root = CertificateAuthority.create()
    intermediate = root.intermediate()
    _plug_in(tmp_path / "ca", intermediate, root, chain=False)
    ca = LocalCa.load_or_create(tmp_path / "ca", trust_domain="cluster.local", now=NOW)
    assert _issue(ca).intermediates == (intermediate.cert,)


def test_incomplete_plug_in_names_missing_files(tmp_path):
    state = tmp_path / "ca"
    state.mkdir(mode=0o700)
    state.chmod(0o700)
    (state / CA_CERT_FILE).write_bytes(CertificateAuthority.create().cert_pem)
    with pytest.raises(LocalCaError, match=f"lacks {CA_KEY_FILE}, {ROOT_CERT_FILE}"):
        LocalCa.load_or_create(state, trust_domain="cluster.local", now=NOW)


def test_key_of_another_ca_is_refused(tmp_path):
    root = CertificateAuthority.create()
    intermediate = root.intermediate()
    _plug_in(tmp_path / "ca", intermediate, root)
    (tmp_path / "ca" / CA_KEY_FILE).write_bytes(CertificateAuthority.create().key_pem)
    with pytest.raises(LocalCaError, match="does not belong to"):
        LocalCa.load_or_create(tmp_path / "ca", trust_domain="cluster.local", now=NOW)


def test_ca_that_does_not_chain_to_root_is_refused(tmp_path):
    intermediate = CertificateAuthority.create().intermediate()
    _plug_in(tmp_path / "ca", intermediate, CertificateAuthority.create(), chain=False)
    with pytest.raises(LocalCaError, match="does not chain to"):
        LocalCa.load_or_create(tmp_path / "ca", trust_domain="cluster.local", now=NOW)


def test_issued_certificate_has_istiods_workload_profile(tmp_path):
    ca = LocalCa.load_or_create(tmp_path / "ca", trust_domain="cluster.local", now=NOW)
    leaf = _issue(ca, ttl_s=7200).leaf
    assert len(leaf.subject) == 0
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.critical
    assert list(san.value) == [x509.UniformResourceIdentifier(str(ID))]
    ku = leaf.extensions.get_extension_for_class(x509.KeyUsage)
    assert ku.critical
    assert ku.value.digital_signature and ku.value.key_encipherment
    assert not ku.value.key_cert_sign
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    assert not leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    aki = leaf.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    ski = ca.ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == ski.digest
    assert leaf.not_valid_before_utc.timestamp() == NOW - 120
    assert leaf.not_valid_after_utc.timestamp() == NOW + 7200
    assert leaf.serial_number.bit_length() <= 128


def test_ttl_defaults_and_caps(tmp_path):
    ca = LocalCa.load_or_create(tmp_path / "ca", trust_domain="cluster.local", now=NOW)
    day = 86400
    assert _issue(ca, ttl_s=0).not_after == NOW + day
    assert _issue(ca, ttl_s=365 * day).not_after == NOW + 90 * day
    # never beyond the CA certificate itself
    near_ca_expiry = ca.ca_cert.not_valid_after_utc.timestamp() - 3600
    assert _issue(ca, ttl_s=day, now=near_ca_expiry).not_after == near_ca_expiry + 3600


def test_expired_ca_is_refused(tmp_path):
    past = datetime.datetime(2020, 1, 1, tzinfo=datetime.UTC)
    root = CertificateAuthority.create(not_before=past, not_after=past + datetime.timedelta(days=1))
    state = tmp_path / "ca"
    state.mkdir(mode=0o700)
    state.chmod(0o700)
    (state / CA_CERT_FILE).write_bytes(root.cert_pem)
    (state / ROOT_CERT_FILE).write_bytes(root.cert_pem)
    (state / CA_KEY_FILE).write_bytes(root.key_pem)
    (state / CA_KEY_FILE).chmod(0o600)
    with pytest.raises(LocalCaError, match="expired at 2020-01-02"):
        LocalCa.load_or_create(state, trust_domain="cluster.local", now=NOW)


def test_concurrent_first_starts_share_one_root(tmp_path: Path) -> None:
    """Two daemons starting together on one directory end up with the same root."""

    directory = tmp_path / "shared-ca"
    results: list[bytes] = []
    barrier = threading.Barrier(4)

    def start() -> None:
        barrier.wait()
        ca = LocalCa.load_or_create(directory, trust_domain="cluster.local", now=time.time())
        results.append(ca.root_pem)

    threads = [threading.Thread(target=start) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 4
    assert len(set(results)) == 1
