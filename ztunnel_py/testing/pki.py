"""A throw-away PKI for tests: roots, intermediates, server and SPIFFE workload certificates.

Everything is made in memory with ``cryptography``. Workload leaves follow istiod's profile
(empty subject, critical URI SAN, digitalSignature+keyEncipherment, serverAuth+clientAuth), so a
test that talks to our TLS code sees what a real mesh would send. Times default to "valid now"
(one minute back-dated, one day ahead); pass ``not_before``/``not_after`` to make expired or
not-yet-valid certificates.

Example::

    root = CertificateAuthority.create(common_name="test root")
    ica = root.intermediate(common_name="test intermediate")
    leaf = ica.issue_workload("spiffe://cluster.local/ns/default/sa/default")
    cert_path, key_path = leaf.write(tmp_path, "workload")
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

KeyType = Literal["ec", "rsa"]
PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
PublicKey = ec.EllipticCurvePublicKey | rsa.RSAPublicKey

_DEFAULT_BACKDATE = datetime.timedelta(minutes=1)
_DEFAULT_LEAF_LIFETIME = datetime.timedelta(days=1)
_DEFAULT_CA_LIFETIME = datetime.timedelta(days=3650)


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC).replace(microsecond=0)


def _window(
    not_before: datetime.datetime | None,
    not_after: datetime.datetime | None,
    lifetime: datetime.timedelta,
) -> tuple[datetime.datetime, datetime.datetime]:
    now = _now()
    start = not_before if not_before is not None else now - _DEFAULT_BACKDATE
    end = not_after if not_after is not None else max(now, start) + lifetime
    return start, end


def new_private_key(key_type: KeyType = "ec") -> PrivateKey:
    """ECDSA P-256 (istiod's and ztunnel's choice) or RSA 2048."""
    if key_type == "ec":
        return ec.generate_private_key(ec.SECP256R1())
    if key_type == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    raise ValueError(f"unknown key_type {key_type!r}: use 'ec' or 'rsa'")


def key_to_pem(key: PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def cert_to_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


@dataclass(frozen=True, slots=True)
class IssuedCert:
    """A leaf: its PEM, its key's PEM (empty when the key was the caller's), leaf+intermediates."""

    cert_pem: bytes
    key_pem: bytes
    chain_pem: bytes

    @property
    def cert(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.cert_pem)

    def write(self, directory: str | os.PathLike[str], stem: str) -> tuple[Path, Path]:
        """Write ``<stem>.pem`` (leaf + intermediates) and ``<stem>-key.pem`` (mode 0600)."""
        base = Path(directory)
        base.mkdir(parents=True, exist_ok=True)
        cert_path = base / f"{stem}.pem"
        key_path = base / f"{stem}-key.pem"
        cert_path.write_bytes(self.chain_pem)
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(self.key_pem)
        return cert_path, key_path


@dataclass(frozen=True, slots=True)
class CertificateAuthority:
    """A signing CA. ``parents`` are the CAs above it, nearest first, ending with the root."""

    cert: x509.Certificate
    key: PrivateKey
    parents: tuple[x509.Certificate, ...] = field(default=())

    # --- construction ------------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        common_name: str = "ztunnel-py test root",
        not_before: datetime.datetime | None = None,
        not_after: datetime.datetime | None = None,
        key_type: KeyType = "ec",
        *,
        organization: str = "cluster.local",
    ) -> CertificateAuthority:
        """A self-signed root."""
        key = new_private_key(key_type)
        name = _ca_name(common_name, organization)
        start, end = _window(not_before, not_after, _DEFAULT_CA_LIFETIME)
        builder = _ca_builder(name, name, key.public_key(), start, end, issuer_key=key)
        return cls(cert=builder.sign(key, hashes.SHA256()), key=key)

    def intermediate(
        self,
        common_name: str = "ztunnel-py test intermediate",
        not_before: datetime.datetime | None = None,
        not_after: datetime.datetime | None = None,
        key_type: KeyType = "ec",
        *,
        organization: str = "cluster.local",
    ) -> CertificateAuthority:
        """A CA signed by this one."""
        key = new_private_key(key_type)
        start, end = _window(not_before, not_after, _DEFAULT_CA_LIFETIME)
        builder = _ca_builder(
            _ca_name(common_name, organization),
            self.cert.subject,
            key.public_key(),
            start,
            end,
            issuer_key=self.key,
        )
        cert = builder.sign(self.key, hashes.SHA256())
        return CertificateAuthority(cert=cert, key=key, parents=(self.cert, *self.parents))

    def crl(
        self,
        revoked: Iterable[x509.Certificate | int] = (),
        *,
        next_update: datetime.timedelta = datetime.timedelta(days=7),
        delta: bool = False,
        encoding: serialization.Encoding = serialization.Encoding.PEM,
    ) -> bytes:
        """A CRL signed by this CA revoking ``revoked`` (certificates or serial numbers);
        ``delta`` marks it a delta CRL; ``next_update`` may be negative (an expired CRL)."""
        now = _now()
        last_update = min(now - _DEFAULT_BACKDATE, now + next_update - _DEFAULT_BACKDATE)
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(self.cert.subject)
            .last_update(last_update)
            .next_update(now + next_update)
            .add_extension(x509.CRLNumber(1), critical=False)
        )
        if delta:
            builder = builder.add_extension(x509.DeltaCRLIndicator(1), critical=True)
        for item in revoked:
            serial = item if isinstance(item, int) else item.serial_number
            entry = (
                x509.RevokedCertificateBuilder()
                .serial_number(serial)
                .revocation_date(now - _DEFAULT_BACKDATE)
                .build()
            )
            builder = builder.add_revoked_certificate(entry)
        return builder.sign(self.key, hashes.SHA256()).public_bytes(encoding)

    # --- PEM views ---------------------------------------------------------------------------

    @property
    def cert_pem(self) -> bytes:
        return cert_to_pem(self.cert)

    @property
    def key_pem(self) -> bytes:
        return key_to_pem(self.key)

    @property
    def root(self) -> x509.Certificate:
        return self.parents[-1] if self.parents else self.cert

    @property
    def root_pem(self) -> bytes:
        """The trust anchor of this hierarchy."""
        return cert_to_pem(self.root)

    @property
    def chain_pem(self) -> bytes:
        """This CA and the intermediates above it, without the root (empty for a root)."""
        if not self.parents:
            return b""
        return b"".join(cert_to_pem(c) for c in (self.cert, *self.parents[:-1]))

    # --- issuing -----------------------------------------------------------------------------

    def issue_server(
        self,
        dns_names: Sequence[str] = (),
        ip_addresses: Sequence[str] = (),
        not_before: datetime.datetime | None = None,
        not_after: datetime.datetime | None = None,
    ) -> IssuedCert:
        """A TLS server certificate (for example for a fake istiod) with DNS and IP SANs."""
        names: list[x509.GeneralName] = [x509.DNSName(d) for d in dns_names]
        names += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ip_addresses]
        cn = dns_names[0] if dns_names else (ip_addresses[0] if ip_addresses else "server")
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
        return self._issue(
            subject,
            names,
            critical_san=False,
            eku=[ExtendedKeyUsageOID.SERVER_AUTH],
            not_before=not_before,
            not_after=not_after,
        )

    def issue_workload(
        self,
        spiffe_id: str | None,
        *,
        not_before: datetime.datetime | None = None,
        not_after: datetime.datetime | None = None,
        extra_uris: Iterable[str] = (),
        public_key: PublicKey | None = None,
    ) -> IssuedCert:
        """A workload leaf in istiod's shape. ``spiffe_id=None`` (and no ``extra_uris``) gives
        a leaf with no URI SAN at all, named by a subject CN instead.

        With ``public_key`` (for example from a CSR) the caller owns the key and ``key_pem`` is
        empty.
        """
        uris = ([spiffe_id] if spiffe_id is not None else []) + list(extra_uris)
        names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(u) for u in uris]
        subject = (
            x509.Name([])
            if names
            else x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "workload-without-uri-san")])
        )
        return self._issue(
            subject,
            names,
            critical_san=True,
            eku=[ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH],
            not_before=not_before,
            not_after=not_after,
            public_key=public_key,
        )

    def _issue(
        self,
        subject: x509.Name,
        names: list[x509.GeneralName],
        *,
        critical_san: bool,
        eku: list[x509.ObjectIdentifier],
        not_before: datetime.datetime | None,
        not_after: datetime.datetime | None,
        public_key: PublicKey | None = None,
    ) -> IssuedCert:
        key = new_private_key("ec") if public_key is None else None
        pub = public_key if key is None else key.public_key()
        assert pub is not None
        start, end = _window(not_before, not_after, _DEFAULT_LEAF_LIFETIME)
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self.cert.subject)
            .public_key(pub)
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
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
            .add_extension(x509.ExtendedKeyUsage(eku), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                critical=False,
            )
        )
        if names:
            builder = builder.add_extension(
                x509.SubjectAlternativeName(names), critical=critical_san
            )
        cert = builder.sign(self.key, hashes.SHA256())
        leaf_pem = cert_to_pem(cert)
        return IssuedCert(
            cert_pem=leaf_pem,
            key_pem=key_to_pem(key) if key is not None else b"",
            chain_pem=leaf_pem + self.chain_pem,
        )


def _ca_name(common_name: str, organization: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _ca_builder(
    subject: x509.Name,
    issuer: x509.Name,
    public_key: PublicKey,
    start: datetime.datetime,
    end: datetime.datetime,
    *,
    issuer_key: PrivateKey,
) -> x509.CertificateBuilder:
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
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
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
            critical=False,
        )
    )
