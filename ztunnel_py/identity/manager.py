"""SecretManager: one certificate per SPIFFE identity, fetched, cached and renewed.

Behaviour follows ztunnel's ``identity/manager.rs``:

- ``prefetch(ids)`` asks for certificates at warm-up priority (workloads on this node);
  ``fetch_certificate(id)`` at real-time priority (a connection waits for it).
- Concurrent requests for one identity share one CA call; at most ``concurrency`` (8) CA calls
  run at once, the highest priority first.
- A certificate is renewed at half-life, with a little random jitter so that certificates issued
  together are not all renewed at once.
- A failed fetch is retried with a per-identity exponential backoff (500 ms doubling up to
  150 s, +-20%); meanwhile a still-valid certificate keeps being served until it expires, and
  the retry is moved up to its expiry if that comes first.
- An expired certificate is never returned.

Time comes from an injected ``Clock`` and randomness from an injected ``random.Random``, so tests
drive rotation and backoff with ``testing.clock.FakeClock``.
"""

from __future__ import annotations

import asyncio
import enum
import itertools
import logging
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from ztunnel_py.identity.certificate import WorkloadCertificate, rfc3339
from ztunnel_py.identity.clock import Clock
from ztunnel_py.identity.errors import CertificateUnavailable, IdentityError, IdentityForgotten
from ztunnel_py.identity.spiffe import Identity

log = logging.getLogger(__name__)

DEFAULT_CONCURRENCY = 8
BACKOFF_INITIAL_S = 0.5
BACKOFF_MAX_S = 150.0
BACKOFF_MULTIPLIER = 2.0
BACKOFF_RANDOMIZATION = 0.2
# Renewal lands within +-5% of the lifetime around the half-life.
REFRESH_JITTER = 0.05
# A CA whose certificates arrive already past their renewal point (clock skew, tiny TTL) would
# otherwise be asked again in a tight loop.
MIN_REFRESH_DELAY_S = 1.0


class CaClient(Protocol):
    """Something that turns an identity into a fresh certificate (istiod, local CA, fake)."""

    async def fetch_certificate(self, identity: Identity) -> WorkloadCertificate: ...


class Priority(enum.IntEnum):
    BACKGROUND = 0  # scheduled renewals and retries
    WARMUP = 1  # prefetch for workloads on this node
    REALTIME = 2  # a connection is waiting


class StateKind(enum.Enum):
    INITIALIZING = "Initializing"
    AVAILABLE = "Available"
    UNAVAILABLE = "Unavailable"


@dataclass(frozen=True, slots=True)
class CertState:
    kind: StateKind
    certificate: WorkloadCertificate | None = None
    error: str | None = None

    def describe(self) -> str:
        """ztunnel's ``state`` string: ``Initializing``, ``Available``, ``Unavailable: <err>``."""
        if self.kind is StateKind.UNAVAILABLE:
            return f"Unavailable: {self.error}"
        return str(self.kind.value)


@dataclass(eq=False)
class _Entry:
    identity: Identity
    due: float
    priority: Priority
    cert: WorkloadCertificate | None = None
    error: str | None = None
    failures: int = 0
    fetching: bool = False
    prefetched: bool = False
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    waiters: list[asyncio.Future[WorkloadCertificate]] = field(default_factory=list)
    task: asyncio.Task[None] | None = None


class _PrioritySlots:
    """A semaphore whose waiters are served by their entry's current priority, then FIFO.

    The priority is read when a slot frees up, so a renewal queued in the background jumps
    ahead once a connection starts waiting for the same identity.
    """

    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError("concurrency must be at least 1")
        self._free = size
        self._seq = itertools.count()
        self._waiting: list[tuple[_Entry, int, asyncio.Future[None]]] = []

    async def acquire(self, entry: _Entry) -> None:
        if self._free > 0 and not self._waiting:
            self._free -= 1
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        item = (entry, next(self._seq), fut)
        self._waiting.append(item)
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self.release()  # granted, then cancelled before use: pass the slot on
            elif item in self._waiting:
                self._waiting.remove(item)
            raise

    def release(self) -> None:
        while self._waiting:
            best = max(self._waiting, key=lambda w: (w[0].priority, -w[1]))
            self._waiting.remove(best)
            if not best[2].done():
                best[2].set_result(None)
                return
        self._free += 1


class SecretManager:
    def __init__(
        self,
        ca: CaClient,
        clock: Clock,
        rng: random.Random,
        *,
        concurrency: int = DEFAULT_CONCURRENCY,
    ) -> None:
        self._ca = ca
        self._clock = clock
        self._rng = rng
        self._slots = _PrioritySlots(concurrency)
        self._entries: dict[Identity, _Entry] = {}
        self._listeners: list[Callable[[], None]] = []
        self._closed = False

    # --- public API --------------------------------------------------------------------------

    def prefetch(self, identities: Iterable[Identity]) -> None:
        """Start fetching certificates for ``identities`` at warm-up priority (non-blocking)."""
        for identity in identities:
            entry = self._entries.get(identity)
            if entry is None:
                entry = self._start(identity, Priority.WARMUP)
            else:
                self._raise_priority(entry, Priority.WARMUP)
            entry.prefetched = True

    async def fetch_certificate(self, identity: Identity) -> WorkloadCertificate:
        """A valid certificate for ``identity``, fetching it at real-time priority if needed.

        Raises ``CertificateUnavailable`` when the attempt this call waited for failed and there
        is no valid certificate, or ``IdentityForgotten`` if ``forget`` ran meanwhile.
        """
        if self._closed:
            raise CertificateUnavailable(str(identity), "the secret manager is shut down")
        entry = self._entries.get(identity)
        if entry is None:
            entry = self._start(identity, Priority.REALTIME)
        else:
            cert = self._valid_cert(entry)
            if cert is not None:
                return cert
            self._raise_priority(entry, Priority.REALTIME)
        fut: asyncio.Future[WorkloadCertificate] = asyncio.get_running_loop().create_future()
        entry.waiters.append(fut)
        try:
            return await fut
        finally:
            if fut in entry.waiters:
                entry.waiters.remove(fut)

    def forget(self, identity: Identity) -> None:
        """Stop managing ``identity`` (its last workload left this node)."""
        entry = self._entries.pop(identity, None)
        if entry is None:
            return
        if entry.task is not None:
            entry.task.cancel()
        self._settle(entry, IdentityForgotten(str(identity)))
        log.debug("forgot certificate", extra={"fields": {"identity": str(identity)}})
        self._notify()

    def state(self, identity: Identity) -> CertState | None:
        entry = self._entries.get(identity)
        return None if entry is None else self._state_of(entry)

    def identities(self) -> list[Identity]:
        return sorted(self._entries)

    def all_available(self) -> bool:
        """Readiness: every prefetched identity still managed has a valid certificate."""
        return not self.pending()

    def pending(self) -> list[Identity]:
        """Prefetched identities that have no valid certificate yet."""
        return sorted(
            e.identity
            for e in self._entries.values()
            if e.prefetched and self._valid_cert(e) is None
        )

    def schedule(self) -> list[dict[str, Any]]:
        """When each identity is fetched or renewed next (the debug views' rotation times)."""
        now = self._clock.monotonic()
        return [
            {
                "identity": str(e.identity),
                "nextFetchInSeconds": round(max(0.0, e.due - now), 3),
                "fetching": e.fetching,
                "priority": e.priority.name.lower(),
                "failures": e.failures,
                "lastError": e.error,
                "prefetched": e.prefetched,
            }
            for e in sorted(self._entries.values(), key=lambda e: str(e.identity))
        ]

    def add_listener(self, callback: Callable[[], None]) -> None:
        """``callback()`` runs after every state change (fetch outcome, forget)."""
        self._listeners.append(callback)

    def dump(self) -> list[dict[str, Any]]:
        """``/config_dump`` ``certificates[]``, sorted by identity as ztunnel does."""
        out: list[dict[str, Any]] = []
        for identity in sorted(self._entries, key=str):
            state = self._state_of(self._entries[identity])
            item: dict[str, Any] = {
                "identity": str(identity),
                "state": state.describe(),
                "certChain": [],
                "rootCerts": [],
            }
            if state.certificate is not None:
                item.update(state.certificate.dump())
            out.append(item)
        return out

    async def close(self) -> None:
        self._closed = True
        entries = list(self._entries.values())
        self._entries.clear()
        tasks = [e.task for e in entries if e.task is not None]
        for entry in entries:
            if entry.task is not None:
                entry.task.cancel()
            self._settle(entry, CertificateUnavailable(str(entry.identity), "shutting down"))
        await asyncio.gather(*tasks, return_exceptions=True)

    # --- internals ---------------------------------------------------------------------------

    def _start(self, identity: Identity, priority: Priority) -> _Entry:
        entry = _Entry(identity=identity, due=self._clock.monotonic(), priority=priority)
        self._entries[identity] = entry
        entry.task = asyncio.get_running_loop().create_task(
            self._run(entry), name=f"certificate {identity}"
        )
        return entry

    def _raise_priority(self, entry: _Entry, priority: Priority) -> None:
        if self._valid_cert(entry) is not None:
            return  # nobody waits; the renewal keeps its time and background priority
        entry.priority = max(entry.priority, priority)
        # A first fetch, or a renewal of an expired certificate, is moved up to now; after a
        # failure the retry keeps its backoff slot, so callers cannot hammer a failing CA.
        if entry.fetching or entry.error is not None:
            return
        now = self._clock.monotonic()
        if entry.due > now:
            entry.due = now
            entry.wake.set()

    def _valid_cert(self, entry: _Entry) -> WorkloadCertificate | None:
        cert = entry.cert
        if cert is None or cert.is_expired(self._clock.wall()):
            return None
        return cert

    def _state_of(self, entry: _Entry) -> CertState:
        cert = self._valid_cert(entry)
        if cert is not None:
            return CertState(StateKind.AVAILABLE, certificate=cert)
        if entry.cert is not None:
            reason = f"certificate expired at {rfc3339(entry.cert.not_after)}"
            if entry.error:
                reason += f"; renewal failed: {entry.error}"
            return CertState(StateKind.UNAVAILABLE, error=reason)
        if entry.error is not None:
            return CertState(StateKind.UNAVAILABLE, error=entry.error)
        return CertState(StateKind.INITIALIZING)

    async def _run(self, entry: _Entry) -> None:
        while True:
            await self._wait_until_due(entry)
            await self._slots.acquire(entry)
            entry.fetching = True
            try:
                result: WorkloadCertificate | str = await self._ca.fetch_certificate(entry.identity)
            except IdentityError as e:
                result = str(e)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # a CA client bug must not stall this identity
                log.exception(
                    "certificate fetch raised an unexpected error",
                    extra={"fields": {"identity": str(entry.identity)}},
                )
                result = f"{type(e).__name__}: {e}"
            finally:
                entry.fetching = False
                self._slots.release()
            if isinstance(result, WorkloadCertificate):
                self._on_success(entry, result)
            else:
                self._on_failure(entry, result)
            self._notify()

    async def _wait_until_due(self, entry: _Entry) -> None:
        while True:
            due = entry.due
            if due <= self._clock.monotonic():
                return
            entry.wake.clear()
            sleeper = asyncio.ensure_future(self._clock.sleep_until(due))
            woken = asyncio.ensure_future(entry.wake.wait())
            try:
                await asyncio.wait({sleeper, woken}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                sleeper.cancel()
                woken.cancel()

    def _on_success(self, entry: _Entry, cert: WorkloadCertificate) -> None:
        if cert.identity != entry.identity:
            # CA clients check this already; a mismatched certificate must never be served.
            self._on_failure(entry, f"the CA client returned a certificate for {cert.identity}")
            return
        now_wall = self._clock.wall()
        if cert.is_expired(now_wall):
            self._on_failure(
                entry, f"the CA returned a certificate that expired at {rfc3339(cert.not_after)}"
            )
            return
        entry.cert = cert
        entry.error = None
        entry.failures = 0
        refresh_in = cert.refresh_at(self._rng.uniform(-REFRESH_JITTER, REFRESH_JITTER)) - now_wall
        entry.due = self._clock.monotonic() + max(refresh_in, MIN_REFRESH_DELAY_S)
        entry.priority = Priority.BACKGROUND
        log.debug(
            "certificate fetched",
            extra={
                "fields": {
                    "identity": str(entry.identity),
                    "serial": cert.serial_number,
                    "refresh_in_s": round(refresh_in, 1),
                }
            },
        )
        self._settle(entry, cert)

    def _on_failure(self, entry: _Entry, error: str) -> None:
        entry.failures += 1
        entry.error = error
        entry.priority = Priority.BACKGROUND
        retry_in = self._backoff(entry.failures)
        valid = self._valid_cert(entry)
        fields: dict[str, Any] = {"identity": str(entry.identity), "error": error}
        if valid is not None:
            until_expiry = valid.not_after - self._clock.wall()
            retry_in = min(retry_in, until_expiry)
            log.info(
                "certificate renewal failed; keeping the current certificate until it expires",
                extra={
                    "fields": {
                        **fields,
                        "expires_in_s": round(until_expiry, 1),
                        "retry_in_s": round(retry_in, 3),
                    }
                },
            )
            self._settle(entry, valid)
        else:
            log.warning(
                "certificate fetch failed and no valid certificate is available",
                extra={"fields": {**fields, "retry_in_s": round(retry_in, 3)}},
            )
            self._settle(entry, CertificateUnavailable(str(entry.identity), error))
        entry.due = self._clock.monotonic() + retry_in

    def _backoff(self, failures: int) -> float:
        exponent = min(failures - 1, 32)  # far past the cap; keeps the float finite
        base = min(BACKOFF_INITIAL_S * BACKOFF_MULTIPLIER**exponent, BACKOFF_MAX_S)
        spread = self._rng.uniform(1 - BACKOFF_RANDOMIZATION, 1 + BACKOFF_RANDOMIZATION)
        return min(base * spread, BACKOFF_MAX_S)

    @staticmethod
    def _settle(entry: _Entry, outcome: WorkloadCertificate | BaseException) -> None:
        waiters, entry.waiters = entry.waiters, []
        for fut in waiters:
            if fut.done():
                continue
            if isinstance(outcome, BaseException):
                fut.set_exception(outcome)
            else:
                fut.set_result(outcome)

    def _notify(self) -> None:
        for callback in list(self._listeners):
            try:
                callback()
            except Exception:  # a listener's bug must not stop certificate renewal
                log.exception("certificate state listener failed")
