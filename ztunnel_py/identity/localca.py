"""The embedded CA used when there is no istiod (``LOCAL_CA_DIR``, default /var/lib/ztunnel-py/ca).

On first start it creates a self-signed ECDSA P-256 root in the state directory (directory mode
0700, key 0600); later starts load the same files, so the root, and with it every peer's trust,
survives restarts. An operator can instead plug in an existing CA with Istio's file names:

- ``ca-cert.pem``    the signing certificate (a root, or an intermediate)
- ``ca-key.pem``     its private key
- ``root-cert.pem``  the trust root(s) handed to workloads
- ``cert-chain.pem`` optional: ``ca-cert.pem`` followed by any intermediates up to the root

The generated root is stored under the same names (with ``ca-cert.pem`` equal to
``root-cert.pem``), so both cases share one loading path. ``certs/gen.sh`` makes a plug-in
directory by hand.

Workload certificates follow istiod's profile (``security/pkg/pki/util/generate_cert.go``):
empty subject, the SPIFFE id as a critical URI SAN, key usage digitalSignature+keyEncipherment,
extended key usage serverAuth+clientAuth, basic constraints CA:FALSE, an authority key
identifier, a 128-bit random serial, notBefore back-dated by 2 minutes for clock skew, and
notAfter = now + the requested TTL (24h when the request asks for none). Where istiod refuses a
TTL above its 90-day maximum, this CA caps it, and it never lets a leaf outlive the CA's own
certificate.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import fcntl
import logging
import os
import secrets
import stat
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ztunnel_py.identity.certificate import (
    cert_pem,
    check_chains_to_roots,
    load_pem_certificates,
)
from ztunnel_py.identity.csr import parse_csr
from ztunnel_py.identity.errors import CertificateError, LocalCaError
from ztunnel_py.identity.spiffe import Identity

log = logging.getLogger(__name__)

CA_CERT_FILE = "ca-cert.pem"
CA_KEY_FILE = "ca-key.pem"
ROOT_CERT_FILE = "root-cert.pem"
CERT_CHAIN_FILE = "cert-chain.pem"

DEFAULT_WORKLOAD_TTL_S = 24 * 3600.0  # istiod's DEFAULT_WORKLOAD_CERT_TTL
MAX_WORKLOAD_TTL_S = 90 * 24 * 3600.0  # istiod's MAX_WORKLOAD_CERT_TTL
CLOCK_SKEW_GRACE_S = 120.0  # istiod's ClockSkewGracePeriod
ROOT_TTL_S = 10 * 365 * 24 * 3600.0  # istiod's self-signed root lifetime

CaPrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


LOCK_FILE = ".lock"


@contextlib.contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _utc(ts: float) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(int(ts), tz=datetime.UTC)


def _check_private(path: Path, *, directory: bool) -> None:
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        wanted = "700" if directory else "600"
        kind = "directory" if directory else "key file"
        raise LocalCaError(
            f"local CA {kind} {path} has mode {mode:04o}, which lets group or others read it;"
            f" the CA key must be private to ztunnel-py: run `chmod {wanted} {path}`"
        )


@dataclass(frozen=True, slots=True, eq=False)
class LocalCa:
    directory: Path | None  # None for an in-memory CA
    ca_cert: x509.Certificate
    ca_key: CaPrivateKey
    # Certificates between ca_cert and the roots, nearest first (never a root).
    intermediates: tuple[x509.Certificate, ...]
    roots: tuple[x509.Certificate, ...]
    plugged_in: bool
    created: bool = False  # this start made the root (first start, or the directory was lost)

    @classmethod
    def load_or_create(
        cls, directory: str | os.PathLike[str], *, trust_domain: str, now: float
    ) -> LocalCa:
        """Load the CA from ``directory``, creating a new root there on first start."""
        path = Path(directory)
        if not path.exists():
            path.mkdir(parents=True, mode=0o700, exist_ok=True)
            path.chmod(0o700)  # mkdir's mode is filtered by the umask
        elif not path.is_dir():
            raise LocalCaError(f"local CA path {path} exists but is not a directory")
        _check_private(path, directory=True)
        # Several daemons on one machine (the testbed's nodes) may share a directory: the lock
        # makes the first one create the root and the others load it.
        with _exclusive(path / LOCK_FILE):
            return cls._load_or_create_locked(path, trust_domain=trust_domain, now=now)

    @classmethod
    def _load_or_create_locked(cls, path: Path, *, trust_domain: str, now: float) -> LocalCa:
        present = {
            name
            for name in (CA_CERT_FILE, CA_KEY_FILE, ROOT_CERT_FILE, CERT_CHAIN_FILE)
            if (path / name).exists()
        }
        if not present:
            cls._create_root(path, trust_domain=trust_domain, now=now)
            ca = dataclasses.replace(cls._load(path, now=now, plugged_in=False), created=True)
            # Right on a node's first start; after a lost directory, every peer that trusts
            # the previous root refuses this node (readiness then goes false: ``mtls``).
            log.warning(
                "created a new local CA root in %s: peers that trust the previous root (if this"
                " node had one) will refuse this node's certificates; restore the directory, or"
                " plug the mesh's CA files in, to keep one root",
                path,
                extra={"fields": {"dir": str(path), "serial": ca.ca_cert.serial_number}},
            )
            return ca
        missing = [n for n in (CA_CERT_FILE, CA_KEY_FILE, ROOT_CERT_FILE) if n not in present]
        if missing:
            raise LocalCaError(
                f"local CA directory {path} has {', '.join(sorted(present))} but lacks"
                f" {', '.join(missing)}: add the missing files to plug in a CA,"
                " or empty the directory to let ztunnel-py create a new root"
            )
        ca_pem = (path / CA_CERT_FILE).read_bytes()
        root_pem = (path / ROOT_CERT_FILE).read_bytes()
        plugged_in = ca_pem.strip() != root_pem.strip() or (path / CERT_CHAIN_FILE).exists()
        ca = cls._load(path, now=now, plugged_in=plugged_in)
        log.info(
            "loaded local CA",
            extra={
                "fields": {
                    "dir": str(path),
                    "plugged_in": plugged_in,
                    "serial": ca.ca_cert.serial_number,
                }
            },
        )
        return ca

    @classmethod
    def ephemeral(cls, *, trust_domain: str, now: float) -> LocalCa:
        """A CA whose root lives only in memory (``FAKE_CA=true``): every identity of this
        process trusts the others, nothing is written, and a restart makes a new root."""
        cert, key = _new_root(trust_domain, now)
        return cls(
            directory=None,
            ca_cert=cert,
            ca_key=key,
            intermediates=(),
            roots=(cert,),
            plugged_in=False,
        )

    @staticmethod
    def _create_root(path: Path, *, trust_domain: str, now: float) -> None:
        cert, key = _new_root(trust_domain, now)
        key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        # The key goes first and the certificate last: a crash in between leaves a directory
        # that load_or_create reports as incomplete instead of silently minting a second root.
        # A write that fails (disk full, read-only) takes back what this attempt wrote, so the
        # next start, with room again, makes the root as on a first start.
        written: list[Path] = []
        try:
            for name, data, mode in (
                (CA_KEY_FILE, key_pem, 0o600),
                (ROOT_CERT_FILE, cert_pem(cert), 0o644),
                (CA_CERT_FILE, cert_pem(cert), 0o644),
            ):
                _write_atomic(path / name, data, mode)
                written.append(path / name)
        except OSError as e:
            for done in written:
                done.unlink(missing_ok=True)
            raise LocalCaError(
                f"cannot create the local CA root in {path}: {e.strerror or e}; free space or"
                " fix the directory's permissions, then start again"
            ) from None

    @classmethod
    def _load(cls, path: Path, *, now: float, plugged_in: bool) -> LocalCa:
        key_path = path / CA_KEY_FILE
        _check_private(key_path, directory=False)
        try:
            ca_cert = load_pem_certificates(
                (path / CA_CERT_FILE).read_bytes(), str(path / CA_CERT_FILE)
            )[0]
            roots = load_pem_certificates(
                (path / ROOT_CERT_FILE).read_bytes(), str(path / ROOT_CERT_FILE)
            )
            chain_path = path / CERT_CHAIN_FILE
            chain = (
                load_pem_certificates(chain_path.read_bytes(), str(chain_path))
                if chain_path.exists() and chain_path.read_bytes().strip()
                else []
            )
        except CertificateError as e:
            raise LocalCaError(f"local CA in {path}: {e}") from None
        try:
            key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        except (ValueError, TypeError) as e:
            raise LocalCaError(f"local CA key {key_path} is not a usable PEM key: {e}") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
            raise LocalCaError(f"local CA key {key_path} must be ECDSA or RSA")
        fmt = serialization.PublicFormat.SubjectPublicKeyInfo
        if key.public_key().public_bytes(
            serialization.Encoding.DER, fmt
        ) != ca_cert.public_key().public_bytes(serialization.Encoding.DER, fmt):
            raise LocalCaError(f"local CA key {key_path} does not belong to {path / CA_CERT_FILE}")
        try:
            basic = ca_cert.extensions.get_extension_for_class(x509.BasicConstraints).value
            is_ca = basic.ca
        except x509.ExtensionNotFound:
            is_ca = False
        if not is_ca:
            raise LocalCaError(
                f"{path / CA_CERT_FILE} is not a CA certificate (basicConstraints CA:TRUE missing)"
            )
        if ca_cert.not_valid_after_utc.timestamp() <= now:
            raise LocalCaError(
                f"local CA certificate {path / CA_CERT_FILE} expired at"
                f" {ca_cert.not_valid_after_utc.isoformat()}: replace the CA files"
            )
        intermediates = tuple(c for c in chain if c != ca_cert and c not in roots)
        try:
            check_chains_to_roots(ca_cert, intermediates, roots)
        except CertificateError as e:
            raise LocalCaError(
                f"{path / CA_CERT_FILE} does not chain to {path / ROOT_CERT_FILE}: {e}"
            ) from None
        return cls(
            directory=path,
            ca_cert=ca_cert,
            ca_key=key,
            intermediates=intermediates,
            roots=tuple(roots),
            plugged_in=plugged_in,
        )

    # --- signing -----------------------------------------------------------------------------

    @property
    def root_pem(self) -> bytes:
        return b"".join(cert_pem(c) for c in self.roots)

    def sign(self, csr_pem: str, identity: Identity, ttl_s: float, *, now: float) -> list[str]:
        """Sign ``csr_pem`` for ``identity``; returns the chain in istiod's response shape.

        As istiod does, the identity comes from the caller, not from the CSR's SANs.
        """
        try:
            public_key = parse_csr(csr_pem).public_key
        except CertificateError as e:
            raise LocalCaError(f"local CA refused the request for {identity}: {e}") from None
        ttl = DEFAULT_WORKLOAD_TTL_S if ttl_s <= 0 else min(ttl_s, MAX_WORKLOAD_TTL_S)
        end = min(now + ttl, self.ca_cert.not_valid_after_utc.timestamp())
        leaf = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([]))
            .issuer_name(self.ca_cert.subject)
            .public_key(public_key)
            .serial_number(int.from_bytes(secrets.token_bytes(16), "big") or 1)
            .not_valid_before(_utc(now - CLOCK_SKEW_GRACE_S))
            .not_valid_after(_utc(end))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=True,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.ca_key.public_key()),
                critical=False,
            )
            # Critical because the subject is empty (RFC 5280 4.2.1.6), as istiod does.
            .add_extension(
                x509.SubjectAlternativeName([x509.UniformResourceIdentifier(str(identity))]),
                critical=True,
            )
            .sign(self.ca_key, hashes.SHA256())
        )
        return response_chain(leaf, self.signing_chain(), self.roots)

    def signing_chain(self) -> tuple[x509.Certificate, ...]:
        """What goes between a leaf and the roots: the CA cert (unless it is a root) and its
        intermediates."""
        own = () if self.ca_cert in self.roots else (self.ca_cert,)
        return own + self.intermediates


def _new_root(trust_domain: str, now: float) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, trust_domain),
            x509.NameAttribute(NameOID.COMMON_NAME, "ztunnel-py local CA"),
        ]
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_utc(now - CLOCK_SKEW_GRACE_S))
        .not_valid_after(_utc(now + ROOT_TTL_S))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def response_chain(
    leaf: x509.Certificate,
    intermediates: Sequence[x509.Certificate],
    roots: Sequence[x509.Certificate],
) -> list[str]:
    """istiod's ``cert_chain`` layout: leaf, one element per intermediate, roots last."""
    return [
        cert_pem(leaf).decode(),
        *(cert_pem(c).decode() for c in intermediates),
        b"".join(cert_pem(r) for r in roots).decode(),
    ]


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
