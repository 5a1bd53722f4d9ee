"""Where the proxy servers get the TLS contexts of the identities they speak for."""

from __future__ import annotations

import ssl
from collections.abc import Awaitable, Callable
from typing import Protocol

from ztunnel_py.identity.certificate import WorkloadCertificate
from ztunnel_py.identity.spiffe import Identity
from ztunnel_py.identity.tls import client_context, server_context


class CertificateSource(Protocol):
    """TLS contexts carrying the certificate of an identity (fetched, cached, rotated)."""

    async def client_context(self, identity: Identity) -> ssl.SSLContext: ...
    async def server_context(self, identity: Identity) -> ssl.SSLContext: ...


class HandshakeObserver(Protocol):
    """Told how each outbound mTLS handshake went (``identity.mtls_health`` for readiness)."""

    def handshake_succeeded(self) -> None: ...
    def handshake_failed(self, error: Exception) -> None: ...


class FetchedCertificates:
    """A ``CertificateSource`` over any ``fetch(identity) -> WorkloadCertificate``
    (``SecretManager.fetch_certificate`` in the daemon, a test CA in tests)."""

    def __init__(
        self,
        fetch: Callable[[Identity], Awaitable[WorkloadCertificate]],
        *,
        tls12_enabled: bool = False,
    ) -> None:
        self._fetch = fetch
        self._tls12 = tls12_enabled

    async def client_context(self, identity: Identity) -> ssl.SSLContext:
        return client_context(await self._fetch(identity), tls12_enabled=self._tls12)

    async def server_context(self, identity: Identity) -> ssl.SSLContext:
        return server_context(await self._fetch(identity), tls12_enabled=self._tls12)
