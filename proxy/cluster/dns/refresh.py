"""Keeping names resolved: one refresher per ``resolve: true`` / ``srv:`` entry, a cache for plain names.

The timing and failure rules are :class:`RefreshState`, a state machine that
takes ``now`` from the caller (tests drive it with a manual clock):

* an answer is used until its TTL, bounded to ``[min_ttl, max_ttl]``, plus a
  random 0-10% (so a fleet does not query in lockstep), then asked again;
* a failure (timeout, SERVFAIL, refused, unreachable) keeps the last good set
  and asks again after a backoff: ``min_ttl`` doubling per failure in a row, at
  most ``max_ttl`` (same jitter);
* NXDOMAIN or an empty answer also keeps the last good set, but only until
  that set is ``max_stale`` old; then the entry has no replicas until the name
  resolves again (the retry is scheduled so the drop happens on time).

:class:`Refresher` runs the lookups of one entry and hands each changed set to
its upstream (``on_change``); :class:`NameCache` serves the addresses of
plain host names to the connection pools, with the same TTL and failure rules.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import inspect
import ipaddress
import logging
import os
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from prometheus_client import Counter

from proxy.clock import Clock
from proxy.cluster.dns.resolver import NEGATIVE, DnsResolver, LookupFailed
from proxy.cluster.options import DnsOptions

log = logging.getLogger("fender")

__all__ = ["Target", "RefreshState", "Refresher", "NameCache", "WARN_EVERY"]

JITTER = 0.1
# A name that keeps failing is warned about at most once per this many seconds (the counter counts all).
WARN_EVERY = 60.0
MAX_SRV_WEIGHT = 1000  # Fender's weight range is 1..1000; SRV weights go to 65535


@dataclass(frozen=True, slots=True)
class Target:
    """One address a name gave: becomes one replica."""

    host: str  # an IP address
    port: int
    priority: int
    weight: int
    label: str  # the name it came from (shown as "host:port (label)")

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


class RefreshState:
    """When to ask again and which set to serve, for one name (see the module docstring)."""

    def __init__(self, options: DnsOptions, rng: random.Random | None = None) -> None:
        self.options = options
        self._rng = rng or random.Random()
        self.targets: tuple[Target, ...] = ()
        self.last_good: float | None = None  # when the set in use was answered
        self.answered = False  # a good answer ever came
        self.failures = 0  # failed lookups in a row
        self.outcome: str | None = None  # of the last lookup
        self.message = ""  # what the last failure said
        self.truncated = 0  # addresses over max_addresses in the last answer

    def _jitter(self, delay: float) -> float:
        return delay * (1.0 + self._rng.uniform(0.0, JITTER))

    def answer(self, targets: tuple[Target, ...], ttl: float, now: float) -> float:
        """A good answer at ``now``; returns the delay before the next lookup."""
        limit = self.options.max_addresses
        self.truncated = max(0, len(targets) - limit)
        if self.truncated:
            # Which ones: a per-process order, so one sidecar keeps the same subset from answer to
            # answer while a fleet of them spreads over all the addresses.
            targets = tuple(sorted(targets, key=_rank)[:limit])
        # In a stable order: a server rotating its answers (round-robin DNS) is not a change.
        self.targets = tuple(sorted(targets, key=_order))
        self.last_good = now
        self.answered = True
        self.failures = 0
        self.outcome = "ok"
        self.message = ""
        return self._jitter(min(max(ttl, self.options.min_ttl), self.options.max_ttl))

    def failure(self, outcome: str, message: str, now: float) -> float:
        """A failed lookup at ``now``; drops the set when a negative answer finds it too old.

        Returns the delay before the next lookup.
        """
        options = self.options
        self.failures += 1
        self.outcome = outcome
        self.message = message
        delay = self._jitter(min(options.min_ttl * 2 ** min(self.failures - 1, 30), options.max_ttl))
        if outcome in NEGATIVE and self.targets:
            left = self.last_good + options.max_stale - now  # type: ignore[operator]
            if left <= 0:
                self.targets = ()
            else:
                delay = min(delay, left)  # ask again when the set would expire: drop it on time
        return delay

    def age(self, now: float) -> float | None:
        """Seconds since the set in use was answered; None before the first answer."""
        return None if self.last_good is None else now - self.last_good


_SALT = os.urandom(8)


def _rank(target: Target) -> bytes:
    return hashlib.blake2b(target.address.encode(), key=_SALT, digest_size=8).digest()


def _order(target: Target) -> tuple[int, str, int, bytes, int]:
    address = ipaddress.ip_address(target.host)
    return (target.priority, target.label, address.version, address.packed, target.port)


Lookup = Callable[[], Awaitable[tuple[tuple[Target, ...], float]]]


class Refresher:
    """Resolves one entry again and again (a task), calling ``on_change(targets)`` when the set changes."""

    def __init__(
        self,
        upstream: str,
        what: str,
        lookup: Lookup,
        options: DnsOptions,
        clock: Clock,
        on_change: Callable[[tuple[Target, ...]], object],
        counters: dict[str, Counter] | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.upstream = upstream
        self.what = what  # "catalog.svc (resolve)" / "_http._tcp.catalog.svc (srv)": for log lines
        self.lookup = lookup
        self.clock = clock
        self.state = RefreshState(options, rng)
        self.on_change = on_change
        self.counters = counters or {}
        self.next_at = 0.0
        self._task: asyncio.Task[None] | None = None
        self._warned_at: float | None = None
        self._suppressed = 0

    def adopt(self, old: Refresher) -> None:
        """A reload kept this name: take the previous refresher's set and schedule."""
        self.state.targets, self.state.last_good = old.state.targets, old.state.last_good
        self.state.answered, self.state.failures = old.state.answered, old.state.failures
        self.state.outcome, self.state.message = old.state.outcome, old.state.message
        self.next_at = old.next_at

    async def refresh(self) -> None:
        """One lookup and what follows from it (also called once at start, before traffic)."""
        state = self.state
        try:
            targets, ttl = await self.lookup()
        except LookupFailed as failure:
            now = self.clock.now()
            had = state.targets
            delay = state.failure(failure.outcome, str(failure), now)
            self._count(failure.outcome)
            self._warn(failure, had)
            if had and not state.targets:
                await self._changed(())
        else:
            now = self.clock.now()
            previous = state.targets
            delay = state.answer(targets, ttl, now)
            self._count("ok")
            if state.truncated:
                self._warn_truncated(len(targets))
            if self._warned_at is not None:
                log.info("%s: %s resolves again", self.upstream, self.what)
                self._warned_at = None
                self._suppressed = 0
            if state.targets != previous:
                await self._changed(state.targets)
        self.next_at = self.clock.now() + delay

    async def _changed(self, targets: tuple[Target, ...]) -> None:
        result = self.on_change(targets)
        if inspect.isawaitable(result):
            await result

    def _count(self, outcome: str) -> None:
        counter = self.counters.get(outcome)
        if counter is not None:
            counter.inc()

    def _warn(self, failure: LookupFailed, had: tuple[Target, ...]) -> None:
        now = self.clock.now()
        state = self.state
        if had and not state.targets:
            # Not rate-limited: it changes what the upstream serves.
            log.warning(
                "%s: %s: %s; the last good answer is older than max_stale: its %d replicas are dropped",
                self.upstream,
                self.what,
                failure,
                len(had),
            )
            self._warned_at = now
            return
        if self._warned_at is not None and now - self._warned_at < WARN_EVERY:
            self._suppressed += 1
            return
        more = f" ({self._suppressed} more failures since the last warning)" if self._suppressed else ""
        if state.targets:
            keeps = f"keeping the last good answer ({len(state.targets)} replicas, {state.age(now):.0f}s old)"
        else:
            keeps = "the entry has no replicas (requests get 503 no_healthy_replica if none other serves)"
        log.warning("%s: lookup of %s failed: %s; %s%s", self.upstream, self.what, failure, keeps, more)
        self._warned_at = now
        self._suppressed = 0

    def _warn_truncated(self, found: int) -> None:
        now = self.clock.now()
        if self._warned_at is not None and now - self._warned_at < WARN_EVERY:
            return
        log.warning(
            "%s: %s gave %d addresses; only the first %d are used (dns.max_addresses)",
            self.upstream,
            self.what,
            found,
            self.state.options.max_addresses,
        )
        self._warned_at = now

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"dns {self.upstream} {self.what}")

    async def _run(self) -> None:
        clock = self.clock
        while True:
            wait = self.next_at - clock.now()
            if wait > 0:
                await clock.sleep(wait)
            try:
                await self.refresh()
            except Exception:  # pragma: no cover - a bug must not end the refreshing
                log.exception("%s: refreshing %s failed", self.upstream, self.what)
                self.next_at = clock.now() + self.state.options.max_ttl

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


class _Cached:
    __slots__ = ("addresses", "expires", "error", "state", "inflight", "warned_at")

    def __init__(self, options: DnsOptions) -> None:
        self.addresses: tuple[str, ...] = ()
        self.expires = 0.0
        self.error: LookupFailed | None = None
        self.state = RefreshState(options)
        self.inflight: asyncio.Future[tuple[str, ...]] | None = None
        self.warned_at: float | None = None


class NameCache:
    """Addresses of plain host names for the connection pools: asked when a connection opens and
    the answer expired, never more often than the TTL rules allow, one lookup per name at a time."""

    def __init__(self, resolver: DnsResolver, clock: Clock, counter: Counter | None = None) -> None:
        self.resolver = resolver
        self.clock = clock
        self._counter = counter  # fender_dns_lookups_total (labels upstream, outcome), or None
        self._entries: dict[str, _Cached] = {}

    def for_host(self, host: str, upstream: str) -> Callable[[], Awaitable[tuple[str, ...]]]:
        """The ``resolve`` callable a pool takes for ``host``."""

        async def resolve() -> tuple[str, ...]:
            return await self.addresses(host, upstream)

        return resolve

    async def addresses(self, host: str, upstream: str) -> tuple[str, ...]:
        entry = self._entries.get(host)
        if entry is None:
            entry = self._entries[host] = _Cached(self.resolver.options)
        if self.clock.now() < entry.expires:
            if entry.addresses:
                return entry.addresses
            raise entry.error  # type: ignore[misc]
        if entry.inflight is None:
            entry.inflight = asyncio.ensure_future(self._lookup(host, upstream, entry))
            # Its failure reaches every waiter; one that gave up (connect timeout) must not leave
            # it unretrieved.
            entry.inflight.add_done_callback(_retrieve)
        return await asyncio.shield(entry.inflight)

    async def _lookup(self, host: str, upstream: str, entry: _Cached) -> tuple[str, ...]:
        try:
            try:
                answer = await self.resolver.addresses(host)
            except LookupFailed as failure:
                now = self.clock.now()
                delay = entry.state.failure(failure.outcome, str(failure), now)
                self._count(upstream, failure.outcome)
                entry.expires = now + delay
                if entry.state.outcome in NEGATIVE and entry.addresses and entry.state.last_good is not None:
                    if now - entry.state.last_good >= self.resolver.options.max_stale:
                        entry.addresses = ()
                entry.error = failure
                if entry.warned_at is None or now - entry.warned_at >= WARN_EVERY:
                    entry.warned_at = now
                    keeps = (
                        f"keeping the last good addresses ({', '.join(entry.addresses)})"
                        if entry.addresses
                        else "connections to it fail until it resolves"
                    )
                    log.warning("%s: lookup of %s failed: %s; %s", upstream, host, failure, keeps)
                if entry.addresses:
                    return entry.addresses
                raise
            now = self.clock.now()
            self._count(upstream, "ok")
            entry.expires = now + entry.state.answer((), answer.ttl, now)
            entry.addresses = answer.addresses
            entry.error = None
            if entry.warned_at is not None:
                log.info("%s: %s resolves again (%s)", upstream, host, ", ".join(answer.addresses))
                entry.warned_at = None
            return entry.addresses
        finally:
            entry.inflight = None

    def _count(self, upstream: str, outcome: str) -> None:
        if self._counter is not None:
            self._counter.labels(upstream, outcome).inc()


def _retrieve(future: asyncio.Future[tuple[str, ...]]) -> None:
    if not future.cancelled():
        future.exception()
