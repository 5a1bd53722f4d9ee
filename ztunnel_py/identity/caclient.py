"""CA clients: the embedded local CA and ``FAKE_CA`` here, istiod's in ``istiod_ca``.

All of them generate a fresh P-256 key and CSR per request and check the answer the same way
(``WorkloadCertificate.from_ca_response``: roots present, chain leads to them, leaf carries our
key and the requested identity).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from ztunnel_py.config import Config
from ztunnel_py.identity.certificate import WorkloadCertificate
from ztunnel_py.identity.clock import Clock
from ztunnel_py.identity.csr import generate_csr
from ztunnel_py.identity.localca import LocalCa
from ztunnel_py.identity.manager import CaClient
from ztunnel_py.identity.spiffe import Identity

if TYPE_CHECKING:
    from ztunnel_py.identity.istiod_ca import IstiodCaClient

log = logging.getLogger(__name__)

__all__ = [
    "CaClient",
    "LocalCaClient",
    "build_ca_client",
]


class LocalCaClient:
    """Certificates from an in-process CA: the embedded local CA, or ``FAKE_CA``'s."""

    def __init__(self, ca: LocalCa, clock: Clock, *, ttl_s: float) -> None:
        self._ca = ca
        self._clock = clock
        self._ttl_s = ttl_s

    @property
    def ca(self) -> LocalCa:
        return self._ca

    async def fetch_certificate(self, identity: Identity) -> WorkloadCertificate:
        csr = generate_csr(identity)
        chain = self._ca.sign(csr.csr_pem, identity, self._ttl_s, now=self._clock.wall())
        return WorkloadCertificate.from_ca_response(identity, csr.private_key_pem, chain)


def build_ca_client(config: Config, clock: Clock) -> IstiodCaClient | LocalCaClient:
    """The CA client the configuration asks for.

    ``FAKE_CA=true``: an in-memory root made at start (ztunnel signs with a built-in test root;
    ours is per process, so all identities of one daemon trust each other). ``CA_ADDRESS``:
    istiod. Neither: the embedded CA in ``LOCAL_CA_DIR``.
    """
    if config.fake_ca:
        log.warning("FAKE_CA=true: workload certificates come from a throw-away in-memory root")
        ca = LocalCa.ephemeral(trust_domain=config.trust_domain, now=clock.wall())
        return LocalCaClient(ca, clock, ttl_s=config.secret_ttl_s)
    if config.ca_address is not None:
        from ztunnel_py.identity.istiod_ca import IstiodCaClient  # grpc: istiod mode only

        return IstiodCaClient(config)
    ca = LocalCa.load_or_create(
        config.local_ca_dir, trust_domain=config.trust_domain, now=clock.wall()
    )
    return LocalCaClient(ca, clock, ttl_s=config.secret_ttl_s)
