"""A workload's certificate bundle: key, leaf, intermediates and the trust roots for peers.

Built from a CA response as istiod sends it: ``cert_chain[0]`` is the leaf, the middle elements
are intermediates, and the LAST element holds the trust roots (possibly several PEMs
concatenated). Those roots, not the istiod root file, are what peers are verified against.
Pure: parsing and signature checks only, no I/O; times are Unix seconds passed in by the caller.
"""

from __future__ import annotations

import base64
import datetime
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from ztunnel_py.identity.errors import (
    CertificateError,
    IdentityMismatch,
    InvalidSpiffeId,
)
from ztunnel_py.identity.spiffe import Identity

# A chain longer than this is a CA bug or an attack, not a PKI.
_MAX_CHAIN_DEPTH = 8


def uri_sans(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return list(san.get_values_for_type(x509.UniformResourceIdentifier))


def identity_of(cert: x509.Certificate) -> Identity | None:
    """The first URI SAN that is an Istio SPIFFE id (ztunnel takes the first one too)."""
    for uri in uri_sans(cert):
        try:
            return Identity.parse(uri)
        except InvalidSpiffeId:
            continue
    return None


def not_before(cert: x509.Certificate) -> float:
    return cert.not_valid_before_utc.timestamp()


def not_after(cert: x509.Certificate) -> float:
    return cert.not_valid_after_utc.timestamp()


def rfc3339(ts: float) -> str:
    return (
        datetime.datetime.fromtimestamp(ts, tz=datetime.UTC)
        .isoformat(timespec="seconds")
        .replace("+00:00", "Z")
    )


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def dump_certificate(cert: x509.Certificate) -> dict[str, str]:
    """One ``certChain``/``rootCerts`` entry of ztunnel's ``/config_dump``."""
    return {
        "pem": base64.b64encode(cert_pem(cert)).decode(),
        "serialNumber": str(cert.serial_number),
        "validFrom": rfc3339(not_before(cert)),
        "expirationTime": rfc3339(not_after(cert)),
    }


def load_pem_certificates(pem: str | bytes, what: str) -> list[x509.Certificate]:
    """Every certificate in ``pem``; ``what`` names the source in the error message."""
    data = pem.encode() if isinstance(pem, str) else pem
    if b"-----BEGIN CERTIFICATE-----" not in data:
        raise CertificateError(f"{what} holds no PEM certificate")
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError as e:
        raise CertificateError(f"{what} is not valid PEM: {e}") from None


def _issued_by(child: x509.Certificate, issuer: x509.Certificate) -> bool:
    if child.issuer != issuer.subject:
        return False
    try:
        child.verify_directly_issued_by(issuer)
    except (InvalidSignature, ValueError, TypeError):
        return False
    return True


def check_chains_to_roots(
    leaf: x509.Certificate,
    intermediates: Sequence[x509.Certificate],
    roots: Sequence[x509.Certificate],
) -> None:
    """Signatures only (validity times are the caller's business): leaf -> ... -> a root."""
    current = leaf
    for _ in range(_MAX_CHAIN_DEPTH):
        if any(_issued_by(current, root) for root in roots):
            return
        parent = next((c for c in intermediates if _issued_by(current, c)), None)
        if parent is None or parent == current:
            break
        current = parent
    raise CertificateError(
        f"the certificate chain does not lead to the trust roots the CA sent: no issuer found"
        f" for {current.subject.rfc4514_string() or '<empty subject>'}"
        f" (issuer {current.issuer.rfc4514_string()})"
    )


@dataclass(frozen=True, slots=True, eq=False, weakref_slot=True)
class WorkloadCertificate:
    identity: Identity
    private_key_pem: bytes
    leaf: x509.Certificate
    intermediates: tuple[x509.Certificate, ...]
    roots: tuple[x509.Certificate, ...]

    @classmethod
    def from_ca_response(
        cls,
        identity: Identity,
        private_key_pem: bytes,
        cert_chain: Sequence[str | bytes],
    ) -> WorkloadCertificate:
        """Check and assemble a CA answer for ``identity``.

        Refuses a response without roots, with unparsable PEM, whose leaf is for another
        identity, whose leaf does not match the key, or whose chain does not lead to its roots.
        """
        if not cert_chain:
            raise CertificateError(f"the CA returned an empty certificate chain for {identity}")
        if len(cert_chain) < 2:
            raise CertificateError(
                f"the CA response for {identity} has no root certificate"
                " (the last element of cert_chain must hold the trust roots)"
            )
        leaf_and_more = load_pem_certificates(cert_chain[0], "cert_chain[0] (the leaf)")
        leaf, extra = leaf_and_more[0], leaf_and_more[1:]
        intermediates = list(extra)
        for i, element in enumerate(cert_chain[1:-1], start=1):
            intermediates += load_pem_certificates(element, f"cert_chain[{i}]")
        roots = load_pem_certificates(cert_chain[-1], f"cert_chain[{len(cert_chain) - 1}] (roots)")
        return cls.build(identity, private_key_pem, leaf, intermediates, roots)

    @classmethod
    def build(
        cls,
        identity: Identity,
        private_key_pem: bytes,
        leaf: x509.Certificate,
        intermediates: Sequence[x509.Certificate],
        roots: Sequence[x509.Certificate],
    ) -> WorkloadCertificate:
        got = identity_of(leaf)
        if got != identity:
            raise IdentityMismatch(str(identity), str(got) if got else None)
        _check_key_matches(private_key_pem, leaf)
        check_chains_to_roots(leaf, intermediates, roots)
        return cls(
            identity=identity,
            private_key_pem=private_key_pem,
            leaf=leaf,
            intermediates=tuple(intermediates),
            roots=tuple(roots),
        )

    # --- validity ----------------------------------------------------------------------------

    @property
    def not_before(self) -> float:
        return not_before(self.leaf)

    @property
    def not_after(self) -> float:
        return not_after(self.leaf)

    def refresh_at(self, jitter: float = 0.0) -> float:
        """When to renew: at half-life, shifted by ``jitter`` times the lifetime.

        ``jitter`` comes from the caller's random source (for example
        ``rng.uniform(-0.05, 0.05)``) so that certificates issued together are not all renewed
        in the same instant. It must stay within (-0.5, 0.5), i.e. inside the validity.
        """
        if not -0.5 < jitter < 0.5:
            raise ValueError(f"jitter {jitter} must be within (-0.5, 0.5) of the lifetime")
        lifetime = self.not_after - self.not_before
        if lifetime <= 0:
            return self.not_after
        return self.not_before + lifetime * (0.5 + jitter)

    def is_expired(self, now: float) -> bool:
        return now >= self.not_after

    # --- PEM views for TLS -------------------------------------------------------------------

    @property
    def chain_pem(self) -> bytes:
        """Leaf then intermediates: what we send in a handshake."""
        return b"".join(cert_pem(c) for c in (self.leaf, *self.intermediates))

    @property
    def roots_pem(self) -> bytes:
        return b"".join(cert_pem(c) for c in self.roots)

    @property
    def serial_number(self) -> int:
        return self.leaf.serial_number

    def dump(self) -> dict[str, Any]:
        return {
            "certChain": [dump_certificate(c) for c in (self.leaf, *self.intermediates)],
            "rootCerts": [dump_certificate(c) for c in self.roots],
        }


def _check_key_matches(private_key_pem: bytes, leaf: x509.Certificate) -> None:
    try:
        key = serialization.load_pem_private_key(private_key_pem, password=None)
    except (ValueError, TypeError) as e:
        raise CertificateError(f"the private key is not a usable PEM key: {e}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise CertificateError(f"unsupported private key type {type(key).__name__}")
    fmt = serialization.PublicFormat.SubjectPublicKeyInfo
    ours = key.public_key().public_bytes(serialization.Encoding.DER, fmt)
    theirs = leaf.public_key().public_bytes(serialization.Encoding.DER, fmt)
    if ours != theirs:
        raise CertificateError(
            "the leaf certificate's public key is not the key of our CSR"
            " (the CA signed someone else's request)"
        )
