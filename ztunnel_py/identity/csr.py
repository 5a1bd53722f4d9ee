"""Keys and certificate signing requests in ztunnel's shape.

A fresh ECDSA P-256 key per request; the CSR has an empty subject and exactly one SAN, a
critical URI SAN holding the SPIFFE id. Pure: no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from ztunnel_py.identity.errors import CertificateError
from ztunnel_py.identity.spiffe import Identity

CsrPublicKey = ec.EllipticCurvePublicKey | rsa.RSAPublicKey


@dataclass(frozen=True, slots=True)
class CertSigningRequest:
    identity: Identity
    csr_pem: str
    private_key_pem: bytes


def generate_csr(identity: Identity) -> CertSigningRequest:
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(str(identity))]),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    return CertSigningRequest(
        identity=identity,
        csr_pem=csr.public_bytes(serialization.Encoding.PEM).decode(),
        private_key_pem=key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )


@dataclass(frozen=True, slots=True)
class ParsedCsr:
    public_key: CsrPublicKey
    uris: tuple[str, ...]


def parse_csr(csr_pem: str | bytes) -> ParsedCsr:
    """Load a PEM CSR, check its self-signature, and return its key and URI SANs (for CAs)."""
    data = csr_pem.encode() if isinstance(csr_pem, str) else csr_pem
    try:
        csr = x509.load_pem_x509_csr(data)
    except ValueError as e:
        raise CertificateError(f"the CSR is not a PEM certificate request: {e}") from None
    try:
        valid = csr.is_signature_valid
    except InvalidSignature:
        valid = False
    if not valid:
        raise CertificateError("the CSR's signature does not match its public key")
    key = csr.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey):
        raise CertificateError(f"the CSR's key type {type(key).__name__} is not ECDSA or RSA")
    try:
        san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = tuple(san.get_values_for_type(x509.UniformResourceIdentifier))
    except x509.ExtensionNotFound:
        uris = ()
    return ParsedCsr(public_key=key, uris=uris)
