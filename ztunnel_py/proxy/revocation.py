"""``CRL_PATH``: the revocation list loaded, watched, checked on every HBONE handshake, and
live connections of a newly revoked peer closed (ztunnel's ``CrlManager`` and
``RevocationIndex``).

- At start a missing file is a warning: nothing is revoked until it appears (the watch picks
  it up). A file that does not parse is an error naming the file, and the daemon serves with
  no CRL, as ztunnel does; unlike ztunnel (which then never checks again) the watch goes on,
  so a fixed file takes effect without a restart.
- On a change the file is read and parsed again in a worker thread; a bad or vanished file is
  an error naming it, and the last good CRLs stay in force.
- Each mTLS handshake, both directions (inbound: the client's chain, reporter
  ``destination``; outbound: the server's chain, reporter ``source``), is refused when the
  peer's chain is revoked (``CertificateRevoked``), counted in
  ``istio_crl_policy_rejections_total``. Admitted connections are tracked; after every
  successful reload each one is judged again and a revoked one is closed with
  ``CERT_REVOKED_ERROR`` (its streams end with the ``CERT_REVOKED`` response flag).
  ``istio_crl_untracked_connections_total`` counts connections that could not be tracked.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from prometheus_client import CollectorRegistry, Counter

from ztunnel_py.errors import truncate
from ztunnel_py.identity.crl import CrlError, CrlSet, build_chain, chain_revocation, parse_crls
from ztunnel_py.identity.tls import (
    CertificateRevoked,
    TlsVerificationError,
    context_authorities,
    peer_certificate,
)
from ztunnel_py.telemetry.metrics import Reporter

log = logging.getLogger(__name__)

CERT_REVOKED_ERROR = "connection closed: peer certificate revoked by CRL"
POLL_INTERVAL_S = 1.0
# A CRL is a list of serials; anything this large is not one (and must not exhaust memory).
MAX_CRL_FILE_BYTES = 64 * 1024 * 1024


class CrlMetrics:
    """ztunnel's ``istio_crl_*`` counters, labelled by ``reporter``."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.rejections = Counter(
            "istio_crl_policy_rejections",
            "The total number of connections rejected due to CRL certificate revocation (unstable)",
            ["reporter"],
            registry=registry,
        )
        self.untracked = Counter(
            "istio_crl_untracked_connections",
            "The total number of connections not tracked for CRL enforcement (unstable)",
            ["reporter"],
            registry=registry,
        )


@dataclass(eq=False, slots=True)
class RevocationHandle:
    """One tracked connection; give it back to ``CrlManager.untrack`` when it ends."""

    id: int
    chain: list[x509.Certificate] = field(repr=False)  # the peer's, leaf first, built once
    reporter: Reporter
    close: Callable[[str], None] = field(repr=False)


@dataclass(frozen=True, slots=True)
class _Stamp:
    inode: int
    size: int
    mtime_ns: int


class CrlManager:
    def __init__(self, path: Path, metrics: CrlMetrics) -> None:
        self.path = path
        self.metrics = metrics
        self.crls: CrlSet | None = None  # None: never loaded
        self.loads = 0
        self.failures = 0
        self.last_error: str | None = None
        self.revoked_connections = 0
        self._stamp: _Stamp | None = None
        self._live: dict[int, RevocationHandle] = {}
        self._ids = itertools.count(1)

    # ------------------------------------------------------------------ loading

    def start(self) -> None:
        """The first load; never raises (see the module docstring)."""
        if self._file_stamp() is None:
            log.warning(
                "CRL file %s not found (CRL_PATH); no certificate is revoked until it appears",
                self.path,
            )
            return
        self._apply(self._read())

    def _read(self) -> CrlSet | CrlError:
        self._stamp = self._file_stamp()
        try:
            with self.path.open("rb") as f:
                data = f.read(MAX_CRL_FILE_BYTES + 1)
        except OSError as e:
            return CrlError(f"CRL file {self.path} cannot be read: {e.strerror or e}")
        if len(data) > MAX_CRL_FILE_BYTES:
            return CrlError(
                f"CRL file {self.path} is larger than {MAX_CRL_FILE_BYTES} bytes; not a CRL"
            )
        try:
            return parse_crls(data, str(self.path))
        except CrlError as e:
            return e

    def _apply(self, loaded: CrlSet | CrlError) -> bool:
        if isinstance(loaded, CrlError):
            self.failures += 1
            self.last_error = truncate(str(loaded))
            keeping = (
                f"keeping the previous {len(self.crls)} CRL(s)"
                if self.crls is not None
                else "no CRL is in force"
            )
            log.error("%s; %s", self.last_error, keeping)
            return False
        self.crls = loaded
        self.loads += 1
        self.last_error = None
        log.info("CRL file %s loaded: %d CRL(s)", self.path, len(loaded))
        self._recheck(loaded)
        return True

    async def reload(self) -> bool:
        """Read and parse in a worker thread, apply on the loop; False when refused."""
        return self._apply(await asyncio.to_thread(self._read))

    def _file_stamp(self) -> _Stamp | None:
        try:
            st = self.path.stat()  # follows symlinks: a ConfigMap's ..data swap changes it
        except OSError:
            return None
        return _Stamp(st.st_ino, st.st_size, st.st_mtime_ns)

    async def watch(self, interval_s: float = POLL_INTERVAL_S) -> None:
        """Poll the file; reload when it changed (also after it vanished and came back)."""
        while True:
            await asyncio.sleep(interval_s)
            stamp = self._file_stamp()
            if stamp != self._stamp:
                if stamp is None:
                    self._stamp = None
                    self._apply(CrlError(f"CRL file {self.path} was removed"))
                    continue
                await self.reload()

    # ------------------------------------------------------------------ handshakes

    def admit(
        self,
        ssl_object: ssl.SSLObject | ssl.SSLSocket,
        *,
        reporter: Reporter,
        close: Callable[[str], None],
    ) -> RevocationHandle | None:
        """After a verified handshake: raise ``CertificateRevoked`` when the peer's chain is
        revoked, else track the connection (``close`` is called if a later CRL revokes it).
        ``None`` when it cannot be tracked (counted)."""
        role = "client" if reporter is Reporter.DESTINATION else "server"
        try:
            leaf = peer_certificate(ssl_object, role)
        except TlsVerificationError:
            self.metrics.untracked.labels(reporter.value).inc()
            return None
        authorities = context_authorities(ssl_object.context)
        if not authorities:
            # Not a context of ours (no CA certificates to verify a CRL with).
            self.metrics.untracked.labels(reporter.value).inc()
            return None
        chain = build_chain(leaf, authorities)
        if self.crls is not None:
            revocation = chain_revocation(chain, self.crls)
            if revocation is not None:
                self.metrics.rejections.labels(reporter.value).inc()
                error = CertificateRevoked(role, f"{revocation} is revoked by {self.path}")
                log.warning("TLS peer verification failed (revoked): %s", error.detail)
                raise error
        handle = RevocationHandle(next(self._ids), chain, reporter, close)
        self._live[handle.id] = handle
        return handle

    def untrack(self, handle: RevocationHandle | None) -> None:
        if handle is not None:
            self._live.pop(handle.id, None)

    @property
    def tracked(self) -> int:
        return len(self._live)

    def _recheck(self, crls: CrlSet) -> None:
        for handle in list(self._live.values()):
            revocation = chain_revocation(handle.chain, crls)
            if revocation is None:
                continue
            self._live.pop(handle.id, None)
            self.revoked_connections += 1
            direction = "inbound" if handle.reporter is Reporter.DESTINATION else "outbound"
            log.warning(
                "terminating %s connection: %s revoked by CRL update", direction, revocation
            )
            try:
                handle.close(CERT_REVOKED_ERROR)
            except Exception:
                log.exception("closing a connection revoked by CRL failed")

    def dump(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "loaded": self.crls is not None,
            "crls": len(self.crls) if self.crls is not None else 0,
            "loads": self.loads,
            "failures": self.failures,
            "lastError": self.last_error,
            "trackedConnections": len(self._live),
            "revokedConnections": self.revoked_connections,
        }
