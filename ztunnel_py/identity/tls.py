"""TLS for HBONE: SSLContexts built from a WorkloadCertificate, and peer identity checks.

As ztunnel does:

- TLS 1.3 only (1.2 as well with ``TLS12_ENABLED=true``), ALPN ``h2``, no session tickets and
  no resumption, mutual TLS (the server requires a client certificate).
- No SNI: the client passes no server name (with asyncio, ``server_hostname=NO_SNI``) and
  OpenSSL does no hostname check. Identity is checked on the URI SAN instead.
- OpenSSL verifies the peer's chain and validity against the roots of *our* certificate (the
  roots that came with it from the CA). The SPIFFE checks OpenSSL cannot do are ours, after the
  handshake: ``verify_server`` (the server's URI SAN must be one of the identities we expected:
  destination workload, service SANs, or waypoint) and ``verify_client`` (the client's trust
  domain must be ours; which identity may connect is authorization's business).

Every refusal is a ``TlsVerificationError`` subclass whose ``check`` names the failed check
(``expired``, ``unknown root``, ``wrong trust domain``, ``no URI SAN``, ``unexpected identity``,
...) and is logged once, with that name, where it is raised. A handshake that OpenSSL refused
is turned into the same errors by ``handshake_error``.

Python's ``ssl`` module loads certificates only from files; the key and chain are handed to
OpenSSL through an anonymous in-memory file (memfd) so the key never touches a disk.
"""

from __future__ import annotations

import logging
import os
import ssl
import tempfile
import weakref
from collections.abc import Collection
from pathlib import Path

from cryptography import x509

from ztunnel_py.identity.certificate import WorkloadCertificate, uri_sans
from ztunnel_py.identity.errors import IdentityError, InvalidSpiffeId
from ztunnel_py.identity.spiffe import Identity

log = logging.getLogger(__name__)

ALPN_H2 = "h2"
# asyncio's create_connection/start_tls treat an empty server_hostname as "send no SNI and do
# no hostname check"; ssl.wrap_socket/wrap_bio take None for the same.
NO_SNI = ""

# OpenSSL X509_V_ERR_* codes that Python reports in SSLCertVerificationError.verify_code.
_X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT = 2
_X509_V_ERR_CERT_SIGNATURE_FAILURE = 7
_X509_V_ERR_CERT_NOT_YET_VALID = 9
_X509_V_ERR_CERT_HAS_EXPIRED = 10
_X509_V_ERR_DEPTH_ZERO_SELF_SIGNED_CERT = 18
_X509_V_ERR_SELF_SIGNED_CERT_IN_CHAIN = 19
_X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT_LOCALLY = 20
_X509_V_ERR_UNABLE_TO_VERIFY_LEAF_SIGNATURE = 21
_X509_V_ERR_CERT_UNTRUSTED = 27
_UNKNOWN_ROOT_CODES = frozenset(
    {
        _X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT,
        _X509_V_ERR_CERT_SIGNATURE_FAILURE,
        _X509_V_ERR_DEPTH_ZERO_SELF_SIGNED_CERT,
        _X509_V_ERR_SELF_SIGNED_CERT_IN_CHAIN,
        _X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT_LOCALLY,
        _X509_V_ERR_UNABLE_TO_VERIFY_LEAF_SIGNATURE,
        _X509_V_ERR_CERT_UNTRUSTED,
    }
)


# --- errors -----------------------------------------------------------------------------------


class TlsVerificationError(IdentityError):
    """A peer failed verification; ``check`` names the check, ``role`` whom we checked."""

    check = "verification"

    def __init__(self, role: str, detail: str) -> None:
        self.role = role
        self.detail = detail
        super().__init__(f"TLS {role} verification failed ({self.check}): {detail}")


class CertificateExpired(TlsVerificationError):
    check = "expired"


class CertificateNotYetValid(TlsVerificationError):
    check = "not yet valid"


class UnknownRoot(TlsVerificationError):
    check = "unknown root"


class NoPeerCertificate(TlsVerificationError):
    check = "no peer certificate"


class NoUriSan(TlsVerificationError):
    check = "no URI SAN"


class WrongTrustDomain(TlsVerificationError):
    check = "wrong trust domain"


class UnexpectedIdentity(TlsVerificationError):
    check = "unexpected identity"


class MalformedCertificate(TlsVerificationError):
    check = "malformed certificate"


class CertificateRevoked(TlsVerificationError):
    """A certificate of the peer's chain is on a CRL of ``CRL_PATH``."""

    check = "revoked"


class HandshakeFailed(TlsVerificationError):
    """OpenSSL refused the handshake for a reason other than the checks above."""

    check = "handshake"


def _refuse(error: TlsVerificationError) -> TlsVerificationError:
    log.warning(
        "TLS peer verification failed (%s): %s",
        error.check,
        error.detail,
        extra={"fields": {"check": error.check, "role": error.role}},
    )
    return error


# --- contexts ---------------------------------------------------------------------------------

_contexts: weakref.WeakKeyDictionary[WorkloadCertificate, dict[tuple[bool, bool], ssl.SSLContext]]
_contexts = weakref.WeakKeyDictionary()
# The CA certificates behind each context (roots, then our intermediates), for CRL checks.
_authorities: weakref.WeakKeyDictionary[ssl.SSLContext, tuple[x509.Certificate, ...]]
_authorities = weakref.WeakKeyDictionary()


def client_context(cert: WorkloadCertificate, *, tls12_enabled: bool = False) -> ssl.SSLContext:
    """Context for dialling a peer's :15008 as ``cert``'s identity (cached per certificate).

    Use it with ``server_hostname=NO_SNI`` (asyncio) or ``None`` (``wrap_socket``), then call
    ``verify_server`` on the connection's SSL object.
    """
    return _cached(cert, server_side=False, tls12_enabled=tls12_enabled)


def server_context(cert: WorkloadCertificate, *, tls12_enabled: bool = False) -> ssl.SSLContext:
    """Context for accepting on :15008 as ``cert``'s identity (cached per certificate).

    Client certificates are required; call ``verify_client`` after the handshake.
    """
    return _cached(cert, server_side=True, tls12_enabled=tls12_enabled)


def _cached(cert: WorkloadCertificate, *, server_side: bool, tls12_enabled: bool) -> ssl.SSLContext:
    per_cert = _contexts.setdefault(cert, {})
    key = (server_side, tls12_enabled)
    ctx = per_cert.get(key)
    if ctx is None:
        ctx = _build(cert, server_side=server_side, tls12_enabled=tls12_enabled)
        per_cert[key] = ctx
    return ctx


def _build(cert: WorkloadCertificate, *, server_side: bool, tls12_enabled: bool) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server_side else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2 if tls12_enabled else ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    if tls12_enabled:
        # ztunnel's TLS 1.2 suites: ECDHE with AES-GCM only.
        ctx.set_ciphers("ECDHE+AESGCM")
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.options |= ssl.OP_NO_TICKET | ssl.OP_NO_COMPRESSION
    if server_side:
        ctx.num_tickets = 0  # TLS 1.3 session tickets: no resumption
        ctx.options |= ssl.OP_NO_RENEGOTIATION
    ctx.set_alpn_protocols([ALPN_H2])
    ctx.load_verify_locations(cadata=cert.roots_pem.decode())
    _load_key_and_chain(ctx, cert)
    _authorities[ctx] = (*cert.roots, *cert.intermediates)
    return ctx


def context_authorities(ctx: ssl.SSLContext) -> tuple[x509.Certificate, ...]:
    """The CA certificates (roots and our intermediates) a context built here verifies with;
    empty for a context built elsewhere."""
    return _authorities.get(ctx, ())


def peer_certificate(ssl_object: ssl.SSLObject | ssl.SSLSocket, role: str) -> x509.Certificate:
    """The verified peer's leaf (``role``: ``client`` or ``server``, for errors)."""
    return _peer_certificate(ssl_object, role)


def _load_key_and_chain(ctx: ssl.SSLContext, cert: WorkloadCertificate) -> None:
    material = cert.private_key_pem + b"\n" + cert.chain_pem
    memfd_create = getattr(os, "memfd_create", None)
    if memfd_create is not None:
        fd = memfd_create("ztunnel-py-cert", os.MFD_CLOEXEC)
        try:
            os.write(fd, material)
            ctx.load_cert_chain(f"/proc/self/fd/{fd}")
        finally:
            os.close(fd)
        return
    # Without memfd (not Linux): a private temporary file, removed at once.
    with tempfile.TemporaryDirectory(prefix="ztunnel-py-") as tmp:
        path = Path(tmp) / "cert.pem"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(material)
        ctx.load_cert_chain(str(path))


# --- post-handshake checks --------------------------------------------------------------------


def _peer_certificate(ssl_object: ssl.SSLObject | ssl.SSLSocket, role: str) -> x509.Certificate:
    der = ssl_object.getpeercert(binary_form=True)
    if not der:
        raise _refuse(NoPeerCertificate(role, "the peer presented no certificate"))
    try:
        cert = x509.load_der_x509_certificate(der)
        cert.extensions  # noqa: B018 (parse them now, so a bad encoding is refused here)
    except ValueError as e:
        # OpenSSL accepted it, but it is not strict DER (for example a duplicate extension).
        error = MalformedCertificate(role, f"the {role} certificate cannot be parsed: {e}")
        raise _refuse(error) from None
    return cert


def _spiffe_ids(cert: x509.Certificate, role: str) -> list[Identity]:
    uris = uri_sans(cert)
    if not uris:
        subject = cert.subject.rfc4514_string() or "<empty subject>"
        raise _refuse(NoUriSan(role, f"the {role} certificate ({subject}) has no URI SAN"))
    ids: list[Identity] = []
    for uri in uris:
        try:
            ids.append(Identity.parse(uri))
        except InvalidSpiffeId:
            continue
    if not ids:
        raise _refuse(
            NoUriSan(role, f"no URI SAN of the {role} certificate is a SPIFFE identity: {uris}")
        )
    return ids


def verify_server(
    ssl_object: ssl.SSLObject | ssl.SSLSocket, expected: Collection[Identity]
) -> Identity:
    """After the client handshake: the server's identity, which must be one of ``expected``."""
    cert = _peer_certificate(ssl_object, "server")
    ids = _spiffe_ids(cert, "server")
    for identity in ids:
        if identity in expected:
            return identity
    want = ", ".join(sorted(str(i) for i in expected)) or "<none>"
    got = ", ".join(str(i) for i in ids)
    raise _refuse(UnexpectedIdentity("server", f"the server is {got}, expected one of: {want}"))


def verify_client(ssl_object: ssl.SSLObject | ssl.SSLSocket, own_trust_domain: str) -> Identity:
    """After the server handshake: the client's identity, whose trust domain must be ours."""
    cert = _peer_certificate(ssl_object, "client")
    identity = _spiffe_ids(cert, "client")[0]
    if identity.trust_domain != own_trust_domain:
        raise _refuse(
            WrongTrustDomain(
                "client",
                f"the client {identity} is in trust domain {identity.trust_domain!r},"
                f" this server accepts only {own_trust_domain!r}",
            )
        )
    return identity


def handshake_error(error: ssl.SSLError, *, role: str) -> TlsVerificationError:
    """Name the check behind an OpenSSL handshake failure (``role``: whose certificate we
    were verifying, ``server`` or ``client``), log it, and return it for the caller to raise."""
    if isinstance(error, ssl.SSLCertVerificationError):
        code = error.verify_code
        detail = f"{error.verify_message} (OpenSSL verify code {code})"
        if code == _X509_V_ERR_CERT_HAS_EXPIRED:
            return _refuse(CertificateExpired(role, f"the {role} certificate has expired"))
        if code == _X509_V_ERR_CERT_NOT_YET_VALID:
            return _refuse(CertificateNotYetValid(role, f"the {role} certificate is not yet valid"))
        if code in _UNKNOWN_ROOT_CODES:
            return _refuse(
                UnknownRoot(role, f"the {role} certificate does not chain to our roots: {detail}")
            )
        return _refuse(HandshakeFailed(role, detail))
    reason = error.reason or str(error)
    if reason == "PEER_DID_NOT_RETURN_A_CERTIFICATE":
        return _refuse(NoPeerCertificate(role, f"the {role} presented no certificate"))
    return _refuse(HandshakeFailed(role, f"{reason} ({error})"))
