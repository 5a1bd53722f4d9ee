"""CRL parsing and the revocation decision (identity/crl.py), as ztunnel's tls/crl.rs and
tls/revocation.rs decide them."""

from __future__ import annotations

import datetime

import pytest
from cryptography.hazmat.primitives import serialization

from ztunnel_py.identity.crl import CrlError, CrlSet, build_chain, find_revocation, parse_crls
from ztunnel_py.testing.pki import CertificateAuthority

SPIFFE = "spiffe://cluster.local/ns/default/sa/client"


@pytest.fixture(scope="module")
def root() -> CertificateAuthority:
    return CertificateAuthority.create()


@pytest.fixture(scope="module")
def intermediate(root: CertificateAuthority) -> CertificateAuthority:
    return root.intermediate()


# --- parsing ------------------------------------------------------------------------------------


def test_empty_file_and_pem_without_crl_blocks_revoke_nothing(root: CertificateAuthority) -> None:
    assert len(parse_crls(b"", "crl.pem")) == 0
    assert len(parse_crls(b"\n  \n", "crl.pem")) == 0
    # a PEM file with only a certificate: no CRL block, nothing revoked (ztunnel skips others)
    assert len(parse_crls(root.cert_pem, "crl.pem")) == 0


def test_pem_with_several_crls_and_other_blocks(
    root: CertificateAuthority, intermediate: CertificateAuthority
) -> None:
    data = root.crl([5]) + root.cert_pem + intermediate.crl([7, 8])
    crls = parse_crls(data, "crl.pem")
    assert len(crls) == 2
    assert [len(list(c)) for c in crls.crls] == [1, 2]


def test_der_crl(root: CertificateAuthority) -> None:
    crls = parse_crls(root.crl([9], encoding=serialization.Encoding.DER), "crl.der")
    assert len(crls) == 1
    assert crls.crls[0].get_revoked_certificate_by_serial_number(9) is not None


def test_garbage_is_refused_naming_the_file() -> None:
    with pytest.raises(
        CrlError, match=r"CRL file /etc/crl/ca-crl.pem: CRL 1 \(DER.*cannot be parsed"
    ):
        parse_crls(b"not a valid CRL", "/etc/crl/ca-crl.pem")


def test_one_bad_pem_block_refuses_the_whole_file(root: CertificateAuthority) -> None:
    bad = b"-----BEGIN X509 CRL-----\nAAAA\n-----END X509 CRL-----\n"
    with pytest.raises(CrlError, match=r"crl.pem: CRL 2 \(PEM\) cannot be parsed"):
        parse_crls(root.crl([1]) + bad, "crl.pem")


def test_truncated_pem_block_is_refused(root: CertificateAuthority) -> None:
    data = root.crl([1])
    with pytest.raises(CrlError, match="CRL 1 has no '-----END X509 CRL-----' line"):
        parse_crls(data[: len(data) // 2], "crl.pem")


def test_delta_crl_is_refused(root: CertificateAuthority) -> None:
    with pytest.raises(CrlError, match="CRL 1 is a delta CRL"):
        parse_crls(root.crl([1], delta=True), "crl.pem")


# --- decision -----------------------------------------------------------------------------------


def _crls(*pems: bytes) -> CrlSet:
    return parse_crls(b"".join(pems), "crl.pem")


def test_revoked_leaf_is_found(root: CertificateAuthority) -> None:
    leaf = root.issue_workload(SPIFFE).cert
    other = root.issue_workload(SPIFFE).cert
    crls = _crls(root.crl([leaf]))
    revocation = find_revocation(leaf, [root.cert], crls)
    assert revocation is not None
    assert revocation.serial == leaf.serial_number
    assert revocation.subject == SPIFFE
    assert SPIFFE in str(revocation)
    assert find_revocation(other, [root.cert], crls) is None


def test_nothing_loaded_or_empty_set_revokes_nothing(root: CertificateAuthority) -> None:
    leaf = root.issue_workload(SPIFFE).cert
    assert find_revocation(leaf, [root.cert], CrlSet()) is None


def test_crl_of_another_issuer_does_not_apply(root: CertificateAuthority) -> None:
    other_ca = CertificateAuthority.create("another root")
    leaf = root.issue_workload(SPIFFE).cert
    # the other CA lists the same serial: it speaks only for its own certificates
    crls = _crls(other_ca.crl([leaf.serial_number]))
    assert find_revocation(leaf, [root.cert, other_ca.cert], crls) is None


def test_forged_crl_with_the_issuers_name_does_not_count(root: CertificateAuthority) -> None:
    # Same subject name as the real root, another key: its signature does not verify.
    impostor = CertificateAuthority.create()  # the default name, as the root fixture's
    assert impostor.cert.subject == root.cert.subject
    leaf = root.issue_workload(SPIFFE).cert
    assert find_revocation(leaf, [root.cert], _crls(impostor.crl([leaf]))) is None


def test_unknown_issuer_is_unknown_status_and_allowed(root: CertificateAuthority) -> None:
    leaf = root.issue_workload(SPIFFE).cert
    # we do not hold the issuer: the CRL's signature cannot be checked, the leaf is allowed
    assert find_revocation(leaf, [], _crls(root.crl([leaf]))) is None


def test_expired_crl_still_revokes(root: CertificateAuthority) -> None:
    leaf = root.issue_workload(SPIFFE).cert
    crls = _crls(root.crl([leaf], next_update=-datetime.timedelta(days=1)))
    assert find_revocation(leaf, [root.cert], crls) is not None


def test_revoked_intermediate_revokes_its_leaves(
    root: CertificateAuthority, intermediate: CertificateAuthority
) -> None:
    leaf = intermediate.issue_workload(SPIFFE).cert
    authorities = [root.cert, intermediate.cert]
    assert build_chain(leaf, authorities) == [leaf, intermediate.cert, root.cert]
    assert find_revocation(leaf, authorities, _crls(root.crl([]))) is None
    revocation = find_revocation(leaf, authorities, _crls(root.crl([intermediate.cert])))
    assert revocation is not None
    assert revocation.serial == intermediate.cert.serial_number


def test_leaf_revoked_by_its_intermediate(
    root: CertificateAuthority, intermediate: CertificateAuthority
) -> None:
    leaf = intermediate.issue_workload(SPIFFE).cert
    authorities = [root.cert, intermediate.cert]
    crls = _crls(root.crl([]), intermediate.crl([leaf]))
    revocation = find_revocation(leaf, authorities, crls)
    assert revocation is not None and revocation.serial == leaf.serial_number


def test_trust_anchor_is_never_judged(root: CertificateAuthority) -> None:
    # A root listing its own serial does not revoke itself (webpki never checks the anchor).
    leaf = root.issue_workload(SPIFFE).cert
    assert find_revocation(leaf, [root.cert], _crls(root.crl([root.cert]))) is None
