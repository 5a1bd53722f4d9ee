"""CSRs in ztunnel's shape: fresh P-256 key, empty subject, exactly one (URI) SAN."""

# mypy: allow-untyped-defs, allow-incomplete-defs

from __future__ import annotations

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from ztunnel_py.identity.csr import generate_csr, parse_csr
from ztunnel_py.identity.errors import CertificateError
from ztunnel_py.identity.spiffe import Identity

ID = Identity("cluster.local", "default", "sleep")


def test_csr_shape():
    req = generate_csr(ID)
    csr = x509.load_pem_x509_csr(req.csr_pem.encode())
    assert csr.is_signature_valid
    assert len(csr.subject) == 0
    key = csr.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey)
    assert key.curve.name == "secp256r1"
    assert len(csr.extensions) == 1
    san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.critical
    assert list(san.value) == [x509.UniformResourceIdentifier(str(ID))]


def test_private_key_matches_csr_and_is_fresh_each_time():
    a, b = generate_csr(ID), generate_csr(ID)
    key = serialization.load_pem_private_key(a.private_key_pem, password=None)
    csr = x509.load_pem_x509_csr(a.csr_pem.encode())
    fmt = serialization.PublicFormat.SubjectPublicKeyInfo
    assert key.public_key().public_bytes(
        serialization.Encoding.DER, fmt
    ) == csr.public_key().public_bytes(serialization.Encoding.DER, fmt)
    assert a.private_key_pem != b.private_key_pem


def test_parse_csr_returns_uris():
    parsed = parse_csr(generate_csr(ID).csr_pem)
    assert parsed.uris == (str(ID),)


def test_parse_csr_refuses_garbage():
    with pytest.raises(CertificateError, match="not a PEM certificate request"):
        parse_csr("-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n")
