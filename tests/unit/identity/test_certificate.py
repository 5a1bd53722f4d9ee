"""WorkloadCertificate: parsing istiod's chain layout, identity and chain checks, timing, dump."""

# mypy: allow-untyped-defs, allow-incomplete-defs

from __future__ import annotations

import base64
import datetime

import pytest

from ztunnel_py.identity.certificate import WorkloadCertificate
from ztunnel_py.identity.csr import generate_csr, parse_csr
from ztunnel_py.identity.errors import CertificateError, IdentityMismatch
from ztunnel_py.identity.spiffe import Identity
from ztunnel_py.testing.pki import CertificateAuthority

ID = Identity("cluster.local", "default", "sleep")
T0 = datetime.datetime(2030, 1, 1, tzinfo=datetime.UTC)


@pytest.fixture(scope="module")
def root() -> CertificateAuthority:
    return CertificateAuthority.create(common_name="root A")


@pytest.fixture(scope="module")
def intermediate(root: CertificateAuthority) -> CertificateAuthority:
    return root.intermediate(common_name="intermediate A")


def _signed(ca: CertificateAuthority, spiffe_id: str | None, **kw):
    req = generate_csr(ID)
    leaf = ca.issue_workload(spiffe_id, public_key=parse_csr(req.csr_pem).public_key, **kw)
    return req.private_key_pem, leaf


def test_leaf_intermediate_and_several_roots(root, intermediate):
    other_root = CertificateAuthority.create(common_name="root B")
    key, leaf = _signed(intermediate, str(ID))
    chain = [
        leaf.cert_pem.decode(),
        intermediate.cert_pem.decode(),
        (root.cert_pem + other_root.cert_pem).decode(),
    ]
    cert = WorkloadCertificate.from_ca_response(ID, key, chain)
    assert cert.identity == ID
    assert cert.leaf == leaf.cert
    assert cert.intermediates == (intermediate.cert,)
    assert cert.roots == (root.cert, other_root.cert)
    assert cert.chain_pem == leaf.cert_pem + intermediate.cert_pem
    assert cert.roots_pem == root.cert_pem + other_root.cert_pem


def test_leaf_signed_by_root_directly(root):
    key, leaf = _signed(root, str(ID))
    cert = WorkloadCertificate.from_ca_response(ID, key, [leaf.cert_pem.decode(), root.cert_pem])
    assert cert.intermediates == ()


def test_identity_must_match_request(root):
    key, leaf = _signed(root, "spiffe://cluster.local/ns/default/sa/other")
    wanted = r"ns/default/sa/other, but .*sa/sleep was requested"
    with pytest.raises(IdentityMismatch, match=wanted):
        WorkloadCertificate.from_ca_response(ID, key, [leaf.cert_pem.decode(), root.cert_pem])


def test_leaf_without_uri_san_is_refused(root):
    key, leaf = _signed(root, None)
    with pytest.raises(IdentityMismatch, match="no SPIFFE identity"):
        WorkloadCertificate.from_ca_response(ID, key, [leaf.cert_pem.decode(), root.cert_pem])


def test_response_without_roots_is_refused(root):
    key, leaf = _signed(root, str(ID))
    with pytest.raises(CertificateError, match="no root certificate"):
        WorkloadCertificate.from_ca_response(ID, key, [leaf.cert_pem.decode()])
    with pytest.raises(CertificateError, match="empty certificate chain"):
        WorkloadCertificate.from_ca_response(ID, key, [])


def test_garbage_is_refused(root):
    key, _ = _signed(root, str(ID))
    with pytest.raises(CertificateError, match=r"cert_chain\[0\] \(the leaf\) holds no PEM"):
        WorkloadCertificate.from_ca_response(ID, key, ["garbage", root.cert_pem.decode()])


def test_chain_must_lead_to_the_roots(root):
    stranger = CertificateAuthority.create(common_name="stranger")
    key, leaf = _signed(stranger, str(ID))
    with pytest.raises(CertificateError, match="does not lead to the trust roots"):
        WorkloadCertificate.from_ca_response(ID, key, [leaf.cert_pem.decode(), root.cert_pem])


def test_leaf_must_carry_our_key(root):
    _, leaf = _signed(root, str(ID))
    other_key = generate_csr(ID).private_key_pem
    with pytest.raises(CertificateError, match="not the key of our CSR"):
        WorkloadCertificate.from_ca_response(ID, other_key, [leaf.cert_pem.decode(), root.cert_pem])


def test_refresh_at_half_life_with_jitter(root):
    key, leaf = _signed(root, str(ID), not_before=T0, not_after=T0 + datetime.timedelta(hours=24))
    cert = WorkloadCertificate.from_ca_response(ID, key, [leaf.cert_pem.decode(), root.cert_pem])
    start = T0.timestamp()
    assert cert.not_before == start
    assert cert.not_after == start + 86400
    assert cert.refresh_at() == start + 43200
    assert cert.refresh_at(0.05) == pytest.approx(start + 43200 + 4320)
    assert cert.refresh_at(-0.05) == pytest.approx(start + 43200 - 4320)
    with pytest.raises(ValueError, match="jitter"):
        cert.refresh_at(0.5)
    assert not cert.is_expired(start + 86399)
    assert cert.is_expired(start + 86400)


def test_dump_shape(root, intermediate):
    key, leaf = _signed(
        intermediate, str(ID), not_before=T0, not_after=T0 + datetime.timedelta(hours=1)
    )
    cert = WorkloadCertificate.from_ca_response(
        ID, key, [leaf.cert_pem.decode(), intermediate.cert_pem.decode(), root.cert_pem.decode()]
    )
    dump = cert.dump()
    assert [e["serialNumber"] for e in dump["certChain"]] == [
        str(leaf.cert.serial_number),
        str(intermediate.cert.serial_number),
    ]
    first = dump["certChain"][0]
    assert base64.b64decode(first["pem"]) == leaf.cert_pem
    assert first["validFrom"] == "2030-01-01T00:00:00Z"
    assert first["expirationTime"] == "2030-01-01T01:00:00Z"
    assert len(dump["rootCerts"]) == 1
    assert base64.b64decode(dump["rootCerts"][0]["pem"]) == root.cert_pem
