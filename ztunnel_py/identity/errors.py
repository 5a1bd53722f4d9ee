"""Errors of the identity package: SPIFFE ids, certificates, the CA and peer verification."""

from __future__ import annotations

from ztunnel_py.errors import ZtunnelError


class IdentityError(ZtunnelError):
    """Base class for everything this package raises on purpose."""


class InvalidSpiffeId(IdentityError):
    """A string is not ``spiffe://<trust domain>/ns/<namespace>/sa/<service account>``."""

    def __init__(self, value: str, reason: str) -> None:
        self.value = value
        self.reason = reason
        super().__init__(
            f"invalid SPIFFE identity {value!r}: {reason}"
            " (expected spiffe://<trust domain>/ns/<namespace>/sa/<service account>)"
        )


class CertificateError(IdentityError):
    """A certificate, key or chain could not be used."""


class IdentityMismatch(CertificateError):
    """The CA returned a certificate for another identity than the one requested."""

    def __init__(self, requested: str, got: str | None) -> None:
        self.requested = requested
        self.got = got
        super().__init__(
            f"the CA returned a certificate for {got or 'no SPIFFE identity'},"
            f" but {requested} was requested"
        )


class CaError(IdentityError):
    """A certificate request to the CA failed (transport, refusal or bad response)."""


class LocalCaError(IdentityError):
    """The embedded CA's state directory or plugged-in files cannot be used."""


class CertificateUnavailable(IdentityError):
    """No valid certificate could be obtained for an identity."""

    def __init__(self, identity: str, reason: str) -> None:
        self.identity = identity
        self.reason = reason
        super().__init__(f"no certificate for {identity}: {reason}")


class IdentityForgotten(CertificateUnavailable):
    """The identity stopped being managed while a caller waited for it."""

    def __init__(self, identity: str) -> None:
        super().__init__(identity, "the identity is no longer needed")
