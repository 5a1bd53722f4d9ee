"""A node whose root the peers do not share (a restarted daemon that lost LOCAL_CA_DIR and made
a new one) cannot serve mTLS: readiness must say so, and recover once handshakes work again."""

from __future__ import annotations

import pytest

from ztunnel_py.hbone.connection import Role
from ztunnel_py.identity.mtls_health import READY_MTLS, MtlsHealth
from ztunnel_py.identity.tls import UnknownRoot
from ztunnel_py.proxy.certificates import FetchedCertificates
from ztunnel_py.proxy.outbound import HboneConnector
from ztunnel_py.proxy.pool import WorkloadKey
from ztunnel_py.proxy.sockopt import PodSocketFactory
from ztunnel_py.proxy.transport import hbone_settings
from ztunnel_py.readiness import Readiness
from ztunnel_py.testing.proxy_harness import CLIENT_ID, SERVER_ID, Pki, start_mesh


@pytest.mark.asyncio
async def test_unknown_root_to_peers_blocks_readiness_until_a_handshake_succeeds() -> None:
    mesh = await start_mesh()
    readiness = Readiness()
    health = MtlsHealth(readiness)
    key = WorkloadKey(
        src_identity=CLIENT_ID,
        dst_identities=frozenset({SERVER_ID}),
        src_ip=mesh.client_ip,
        dst=(mesh.server_ip, 15008),
    )

    def connector(pki: Pki) -> HboneConnector:
        return HboneConnector(
            certificates=FetchedCertificates(pki.fetch),
            sockets=PodSocketFactory(mesh.config, mark=False),
            settings=hbone_settings(Role.CLIENT, mesh.config),
            health=health,
        )

    try:
        lost_root = connector(Pki())  # a fresh CA: the peers never heard of its root
        for attempt in range(1, health.threshold + 1):
            assert readiness.ready, f"unready after only {attempt - 1} failures"
            with pytest.raises(UnknownRoot):
                await lost_root(key, None)
        assert not readiness.ready
        (pending,) = readiness.pending()
        assert pending.startswith(READY_MTLS) and "LOCAL_CA_DIR" in pending

        proto = await connector(mesh.pki)(key, None)  # the mesh's root: a handshake works
        proto.close()
        assert readiness.ready
    finally:
        await mesh.stop()


def test_a_success_between_failures_starts_the_count_again() -> None:
    readiness = Readiness()
    health = MtlsHealth(readiness, threshold=2)
    failure = UnknownRoot("server", "the server certificate does not chain to our roots")
    health.handshake_failed(failure)
    health.handshake_succeeded()
    health.handshake_failed(failure)
    assert readiness.pending() == []
    health.handshake_failed(failure)
    assert len(readiness.pending()) == 1
    health.handshake_failed(ValueError("not about roots"))
    assert len(readiness.pending()) == 1
    assert health.unknown_root_failures == 3
