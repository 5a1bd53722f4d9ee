"""Certificate revocation lists (``CRL_PATH``): parsing and the revocation decision.

Pure: bytes and certificates in, answers out; reading and watching the file is
``proxy/revocation.py``'s business.

As ztunnel (``tls/crl.rs``, ``tls/revocation.rs``):

- the file holds PEM (any number of ``X509 CRL`` blocks, other blocks ignored) or one DER
  CRL; an empty file, or PEM without a CRL block, is a valid empty set (nothing revoked);
- every CRL must parse, or the whole file is refused (``CrlError``, naming the file and which
  CRL); a delta CRL is refused, as webpki refuses them;
- a certificate is checked against the CRLs its issuer signed, the whole chain up to (not
  including) the trust anchor; a CRL whose signature does not verify with the issuer's key
  does not count; a certificate no CRL speaks for is accepted (unknown status allowed), and
  the CRL's ``nextUpdate`` is not enforced (expiration ignored).

The peer's chain is rebuilt from its leaf and the CA certificates we trust or hold (our roots
and the intermediates of our own certificate): Python's ``ssl`` hands us only the peer's leaf.
In a mesh whose workloads share istiod's CA that is the same chain.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from cryptography.x509.oid import ExtensionOID

from ztunnel_py.identity.errors import IdentityError

_PEM_BEGIN = b"-----BEGIN"
_PEM_CRL_BEGIN = b"-----BEGIN X509 CRL-----"
_PEM_CRL_END = b"-----END X509 CRL-----"
# A chain longer than this is not a mesh chain; stop rather than walk a loop of cross-signs.
_MAX_CHAIN_DEPTH = 8


class CrlError(IdentityError):
    """A CRL file that cannot be used; the message names the file and what is wrong."""


@dataclass(frozen=True, slots=True)
class Revocation:
    """Which certificate of a chain a CRL revokes."""

    subject: str
    serial: int
    issuer: str

    def __str__(self) -> str:
        subject = self.subject or "<empty subject>"
        return f"certificate {subject} serial {self.serial:#x} (issuer {self.issuer})"


@dataclass(frozen=True, slots=True)
class CrlSet:
    """The CRLs of one load of the file (possibly none)."""

    crls: tuple[x509.CertificateRevocationList, ...] = ()
    # (CRL index, issuer key) -> whether the signature verifies: checked once per load, not
    # once per handshake or per live connection on a reload.
    _signatures: dict[tuple[int, bytes], bool] = field(
        default_factory=dict, compare=False, repr=False
    )

    def __len__(self) -> int:
        return len(self.crls)

    def signed_by(self, issuer: x509.Certificate) -> list[x509.CertificateRevocationList]:
        """The CRLs named after ``issuer`` whose signature its key verifies."""
        key = issuer.public_key()
        key_der = key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
        out = []
        for i, crl in enumerate(self.crls):
            if crl.issuer != issuer.subject:
                continue
            valid = self._signatures.get((i, key_der))
            if valid is None:
                valid = crl.is_signature_valid(key)  # type: ignore[arg-type]
                self._signatures[(i, key_der)] = valid
            if valid:
                out.append(crl)
        return out


def parse_crls(data: bytes, source: str) -> CrlSet:
    """The CRLs in ``data`` (the content of ``source``, named in errors)."""
    if not data.strip():
        return CrlSet()
    if data.lstrip().startswith(_PEM_BEGIN):
        blocks = _pem_crl_blocks(data, source)
        crls = [_load(block, source, i + 1, pem=True) for i, block in enumerate(blocks)]
    else:
        crls = [_load(data, source, 1, pem=False)]
    return CrlSet(tuple(crls))


def _pem_crl_blocks(data: bytes, source: str) -> list[bytes]:
    blocks: list[bytes] = []
    start = data.find(_PEM_CRL_BEGIN)
    while start != -1:
        end = data.find(_PEM_CRL_END, start)
        if end == -1:
            raise CrlError(
                f"CRL file {source}: CRL {len(blocks) + 1} has no '-----END X509 CRL-----' line"
            )
        end += len(_PEM_CRL_END)
        blocks.append(data[start:end])
        start = data.find(_PEM_CRL_BEGIN, end)
    return blocks


def _load(block: bytes, source: str, index: int, *, pem: bool) -> x509.CertificateRevocationList:
    try:
        crl = x509.load_pem_x509_crl(block) if pem else x509.load_der_x509_crl(block)
        extensions = crl.extensions  # parsed now, so a bad encoding is refused here
        for revoked in crl:
            revoked.serial_number  # noqa: B018 (each entry must parse too)
    except ValueError as e:
        kind = "PEM" if pem else "DER (the file does not start with '-----BEGIN')"
        raise CrlError(f"CRL file {source}: CRL {index} ({kind}) cannot be parsed: {e}") from None
    try:
        extensions.get_extension_for_oid(ExtensionOID.DELTA_CRL_INDICATOR)
    except x509.ExtensionNotFound:
        return crl
    raise CrlError(
        f"CRL file {source}: CRL {index} is a delta CRL, which is not supported; give the full CRL"
    )


def build_chain(
    leaf: x509.Certificate, authorities: Sequence[x509.Certificate]
) -> list[x509.Certificate]:
    """``leaf`` then each issuer found among ``authorities`` (name match and a signature
    that verifies), up to a self-signed one or the first issuer we do not hold."""
    chain = [leaf]
    current = leaf
    while len(chain) < _MAX_CHAIN_DEPTH and current.issuer != current.subject:
        issuer = _issuer_of(current, authorities)
        if issuer is None or issuer in chain:
            break
        chain.append(issuer)
        current = issuer
    return chain


def _issuer_of(
    cert: x509.Certificate, authorities: Sequence[x509.Certificate]
) -> x509.Certificate | None:
    for candidate in authorities:
        if candidate.subject != cert.issuer:
            continue
        try:
            cert.verify_directly_issued_by(candidate)
        except (ValueError, TypeError, InvalidSignature):
            continue
        return candidate
    return None


def find_revocation(
    leaf: x509.Certificate, authorities: Sequence[x509.Certificate], crls: CrlSet
) -> Revocation | None:
    """The first certificate of ``leaf``'s chain that ``crls`` revoke, or ``None``."""
    if not crls:
        return None
    return chain_revocation(build_chain(leaf, authorities), crls)


def chain_revocation(chain: Sequence[x509.Certificate], crls: CrlSet) -> Revocation | None:
    """``find_revocation`` on a chain already built (leaf first)."""
    # Each certificate is judged by its issuer's CRLs, so the anchor itself is never judged.
    for cert, issuer in itertools.pairwise(chain):
        for crl in crls.signed_by(issuer):
            if crl.get_revoked_certificate_by_serial_number(cert.serial_number) is not None:
                return Revocation(
                    subject=_describe(cert),
                    serial=cert.serial_number,
                    issuer=cert.issuer.rfc4514_string(),
                )
    return None


def _describe(cert: x509.Certificate) -> str:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    except x509.ExtensionNotFound:
        uris = []
    return uris[0] if uris else cert.subject.rfc4514_string()
