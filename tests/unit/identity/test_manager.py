"""SecretManager driven by a FakeClock: issue, rotation, outages, expiry, dedupe, backoff."""

# mypy: allow-untyped-defs, allow-incomplete-defs

from __future__ import annotations

import asyncio
import functools
import random
from collections.abc import Callable

import pytest
import pytest_asyncio

from ztunnel_py.identity.errors import CertificateUnavailable, IdentityForgotten
from ztunnel_py.identity.manager import SecretManager
from ztunnel_py.identity.spiffe import Identity
from ztunnel_py.testing.ca import FakeCaClient
from ztunnel_py.testing.clock import FakeClock
from ztunnel_py.testing.pki import CertificateAuthority

A = Identity("cluster.local", "default", "a")
B = Identity("cluster.local", "default", "b")
C = Identity("cluster.local", "default", "c")
LIFETIME = 1000.0


@pytest.fixture(scope="module")
def authority() -> CertificateAuthority:
    return CertificateAuthority.create()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def ca(authority, clock) -> FakeCaClient:
    return FakeCaClient(authority, clock, lifetime_s=LIFETIME)


@pytest_asyncio.fixture
async def manager(ca, clock):
    mgr = SecretManager(ca, clock, random.Random(7))
    yield mgr
    await mgr.close()


async def settle(condition: Callable[[], bool] | None = None, rounds: int = 200) -> None:
    """Let the event loop run the manager's tasks (no wall-clock time involved)."""
    for _ in range(rounds):
        if condition is not None and condition():
            return
        await asyncio.sleep(0)
    if condition is not None:
        assert condition(), "condition not reached after the event loop went idle"


@pytest.mark.asyncio
async def test_issue_and_cache(manager, ca, clock):
    cert = await manager.fetch_certificate(A)
    assert cert.identity == A
    assert cert.not_before == int(clock.wall())
    again = await manager.fetch_certificate(A)
    assert again is cert
    assert ca.count(A) == 1
    assert manager.state(A).describe() == "Available"


@pytest.mark.asyncio
async def test_rotation_at_half_life_with_jitter(manager, ca, clock):
    first = await manager.fetch_certificate(A)
    # jitter is +-5% of the lifetime around the half-life
    clock.advance(LIFETIME * 0.45 - 1)
    await settle()
    assert ca.count(A) == 1
    clock.advance(LIFETIME * 0.10 + 2)
    await settle(lambda: ca.count(A) == 2)
    await settle(lambda: manager.state(A).certificate is not first)
    second = await manager.fetch_certificate(A)
    assert second.serial_number != first.serial_number
    assert second.not_before > first.not_before


@pytest.mark.asyncio
async def test_ca_outage_keeps_serving_the_valid_certificate(manager, ca, clock):
    first = await manager.fetch_certificate(A)
    ca.fail = "istiod is down"
    clock.advance(LIFETIME * 0.6)
    await settle(lambda: ca.count(A) == 2)
    await settle()
    assert await manager.fetch_certificate(A) is first
    assert manager.state(A).describe() == "Available"
    # the CA comes back: the next retry (backoff <= 0.6 s after the first failure) renews
    ca.fail = None
    clock.advance(0.7)
    await settle(lambda: manager.state(A).certificate is not first)
    renewed = await manager.fetch_certificate(A)
    assert renewed.serial_number != first.serial_number
    assert ca.count(A) == 3


@pytest.mark.asyncio
async def test_expired_certificate_is_never_returned(manager, ca, clock):
    first = await manager.fetch_certificate(A)
    ca.fail = "istiod is down"
    # walk up to one second before expiry in steps so every retry gets to run
    while clock.wall() < first.not_after - 1:
        clock.advance(min(10.0, first.not_after - 1 - clock.wall()))
        await settle()
    assert await manager.fetch_certificate(A) is first
    calls = ca.count(A)
    clock.advance(1.0)
    # the retry is moved up to the expiry instant, and fails
    await settle(lambda: ca.count(A) == calls + 1)
    await settle()
    assert manager.state(A).describe().startswith("Unavailable: certificate expired")
    waiting = asyncio.ensure_future(manager.fetch_certificate(A))
    await settle()
    assert not waiting.done()  # waits for the next retry instead of returning the old cert
    clock.advance(200.0)
    await settle(waiting.done)
    with pytest.raises(CertificateUnavailable, match="istiod is down"):
        waiting.result()
    assert manager.dump()[0]["certChain"] == []


@pytest.mark.asyncio
async def test_concurrent_requests_share_one_ca_call(manager, ca):
    ca.gate = asyncio.Event()
    waiters = [asyncio.ensure_future(manager.fetch_certificate(A)) for _ in range(10)]
    await settle(lambda: ca.in_flight == 1)
    await settle()
    assert ca.count(A) == 1
    assert manager.state(A).describe() == "Initializing"
    ca.gate.set()
    results = await asyncio.gather(*waiters)
    assert all(r is results[0] for r in results)
    assert ca.count(A) == 1


@pytest.mark.asyncio
async def test_backoff_is_exponential_per_identity_and_capped(manager, ca, clock):
    ca.fail = "CA refuses"
    with pytest.raises(CertificateUnavailable, match="CA refuses"):
        await manager.fetch_certificate(A)
    delays = []
    for _ in range(12):
        await settle(lambda: clock.next_deadline() is not None)
        deadline = clock.next_deadline()
        assert deadline is not None
        delay = deadline - clock.monotonic()
        delays.append(delay)
        clock.advance(delay)
        await settle(functools.partial(lambda n: ca.count(A) == n, ca.count(A) + 1))
    for n, delay in enumerate(delays):
        base = min(0.5 * 2**n, 150.0)
        assert base * 0.8 <= delay <= min(base * 1.2, 150.0), (n, delay)
    assert max(delays) <= 150.0
    # another identity starts its own backoff at 500 ms, not at A's 150 s
    b_wait = asyncio.ensure_future(manager.fetch_certificate(B))
    await settle(b_wait.done)
    with pytest.raises(CertificateUnavailable):
        b_wait.result()
    await settle(lambda: clock.sleepers == 2)
    b_deadline = clock.next_deadline()  # the earliest sleep: B's, since A's is ~150 s away
    assert b_deadline is not None
    assert b_deadline - clock.monotonic() <= 0.6


@pytest.mark.asyncio
async def test_prefetch_and_readiness(manager, ca):
    ready_changes: list[bool] = []
    manager.add_listener(lambda: ready_changes.append(manager.all_available()))
    ca.gate = asyncio.Event()
    manager.prefetch([A, B])
    assert not manager.all_available()
    assert manager.pending() == [A, B]
    ca.gate.set()
    await settle(manager.all_available)
    assert manager.pending() == []
    assert ready_changes[-1] is True
    assert ca.count(A) == 1 and ca.count(B) == 1
    # identities asked for only at real time do not hold readiness back
    ca.fail = "down"
    with pytest.raises(CertificateUnavailable):
        await manager.fetch_certificate(C)
    assert manager.all_available()


@pytest.mark.asyncio
async def test_realtime_request_jumps_the_queue(ca, clock):
    mgr = SecretManager(ca, clock, random.Random(1), concurrency=1)
    try:
        ca.gate = asyncio.Event()
        warm = [Identity("cluster.local", "warm", f"sa{i}") for i in range(5)]
        mgr.prefetch(warm)
        await settle(lambda: ca.in_flight == 1)
        urgent = asyncio.ensure_future(mgr.fetch_certificate(A))
        await settle()
        ca.gate.set()
        await urgent
        # A was served right after the one warm-up call already in flight
        assert ca.calls[:2] == [warm[0], A]
    finally:
        await mgr.close()


@pytest.mark.asyncio
async def test_forget_releases_waiters_and_drops_state(manager, ca):
    ca.gate = asyncio.Event()
    waiting = asyncio.ensure_future(manager.fetch_certificate(A))
    await settle(lambda: ca.in_flight == 1)
    manager.forget(A)
    with pytest.raises(IdentityForgotten, match="no longer needed"):
        await waiting
    assert manager.state(A) is None
    assert manager.dump() == []


@pytest.mark.asyncio
async def test_dump_states(manager, ca):
    await manager.fetch_certificate(A)
    ca.fail = "connection refused"
    with pytest.raises(CertificateUnavailable):
        await manager.fetch_certificate(B)
    ca.fail = None
    ca.gate = asyncio.Event()
    manager.prefetch([C])
    await settle(lambda: ca.in_flight == 1)
    dump = manager.dump()
    assert [d["identity"] for d in dump] == [str(A), str(B), str(C)]
    assert dump[0]["state"] == "Available"
    assert len(dump[0]["certChain"]) == 1 and len(dump[0]["rootCerts"]) == 1
    assert set(dump[0]["certChain"][0]) == {"pem", "serialNumber", "validFrom", "expirationTime"}
    assert dump[1]["state"] == "Unavailable: connection refused"
    assert dump[1]["certChain"] == [] and dump[1]["rootCerts"] == []
    assert dump[2]["state"] == "Initializing"
    ca.gate.set()
