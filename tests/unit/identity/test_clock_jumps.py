"""The wall clock jumping under the certificate manager (NTP step, VM resumed after a pause):
a certificate that the new time says is expired is never handed out, and a jump back does not
set off renewals."""

# mypy: allow-untyped-defs, allow-incomplete-defs

from __future__ import annotations

import random

import pytest

from ztunnel_py.identity.manager import SecretManager
from ztunnel_py.identity.spiffe import Identity
from ztunnel_py.testing.ca import FakeCaClient
from ztunnel_py.testing.clock import FakeClock
from ztunnel_py.testing.pki import CertificateAuthority

A = Identity("cluster.local", "default", "a")
LIFETIME = 1000.0


@pytest.mark.asyncio
async def test_wall_clock_jumping_past_expiry_fetches_a_fresh_certificate() -> None:
    clock = FakeClock()
    ca = FakeCaClient(CertificateAuthority.create(), clock, lifetime_s=LIFETIME)
    manager = SecretManager(ca, clock, random.Random(7))
    try:
        first = await manager.fetch_certificate(A)
        clock.jump_wall(2 * LIFETIME)  # the monotonic clock (and every timer) did not move
        second = await manager.fetch_certificate(A)
        assert second is not first
        assert not second.is_expired(clock.wall())
        assert ca.count(A) == 2
    finally:
        await manager.close()


@pytest.mark.asyncio
async def test_wall_clock_jumping_back_keeps_the_certificate() -> None:
    clock = FakeClock()
    ca = FakeCaClient(CertificateAuthority.create(), clock, lifetime_s=LIFETIME)
    manager = SecretManager(ca, clock, random.Random(7))
    try:
        first = await manager.fetch_certificate(A)
        clock.jump_wall(-60.0)  # within the certificates' back-dated start
        assert await manager.fetch_certificate(A) is first
        assert ca.count(A) == 1
    finally:
        await manager.close()
