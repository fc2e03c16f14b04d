"""Request coalescing: concurrent misses for one key wait for one upstream request.

Locally a miss leads a :class:`Flight` the others wait for (bounded by
coalesce_timeout on the injected clock); in fleet mode the leader also takes
the key's Redis lock and misses on other sidecars wait for its L2 write
(:meth:`FleetTier.poll <proxy.policies.cache.fleet.FleetTier.poll>`).
URLs whose last answer was not storable skip coalescing for uncacheable_ttl
(:class:`HitForMiss`, Varnish's hit-for-miss): waiting would only serialise them.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from typing import Any

from proxy.policies.cache.request import Request
from proxy.policies.cache.store import Entry, Variants

# Bound on the hit-for-miss table (keys of URLs recently answered with something not storable).
MAX_UNCACHEABLE_KEYS = 10_000


class Flight:
    """One upstream request that concurrent misses for the same key wait for."""

    __slots__ = ("event", "expires")

    def __init__(self, expires: float) -> None:
        self.event = asyncio.Event()
        self.expires = expires  # injected-clock time after which newcomers stop waiting for it


class Flights:
    """The flights in progress of one route's cache, by key."""

    __slots__ = ("_flights", "clock", "timeout")

    def __init__(self, clock: Any, timeout: float) -> None:
        self._flights: dict[bytes, Flight] = {}
        self.clock = clock
        self.timeout = timeout  # coalesce_timeout

    def joinable(self, key: bytes) -> Flight | None:
        """The flight a miss for ``key`` may wait for, if one is in progress."""
        flight = self._flights.get(key)
        if flight is not None and flight.expires <= self.clock.now():
            # A first request that never finished (its client vanished mid-body): stop waiting for it.
            flight.event.set()
            return None
        return flight

    def lead(self, key: bytes) -> Flight:
        """A new flight for ``key``, led by the caller (who must :meth:`land` it)."""
        flight = self._flights[key] = Flight(self.clock.now() + self.timeout)
        return flight

    def land(self, key: bytes, flight: Flight) -> None:
        """The leader's outcome is known (stored or not): wake its waiters."""
        if self._flights.get(key) is flight:
            del self._flights[key]
        flight.event.set()

    async def wait(self, flight: Flight) -> None:
        """Wait for the first request's outcome, at most coalesce_timeout on the injected clock."""
        waiter = asyncio.ensure_future(flight.event.wait())
        timer = asyncio.ensure_future(self.clock.sleep(self.timeout))
        try:
            await asyncio.wait((waiter, timer), return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
            timer.cancel()


class HitForMiss:
    """URL keys whose last answer was not storable -> until when misses skip coalescing (LRU-bounded)."""

    __slots__ = ("table", "ttl", "refresh")

    def __init__(self, ttl: float) -> None:
        self.table: OrderedDict[bytes, float] = OrderedDict()
        self.ttl = ttl  # uncacheable_ttl; 0: off
        self.refresh = ttl / 2  # the inline path re-marks a key when less than this is left

    def __len__(self) -> int:
        return len(self.table)

    def remember(self, key: bytes, now: float) -> None:
        table = self.table
        table[key] = now + self.ttl
        table.move_to_end(key)
        if len(table) > MAX_UNCACHEABLE_KEYS:
            table.popitem(last=False)


def coalesced(
    variants: Variants | None, headers: list[tuple[bytes, bytes]], req: Request, now: float
) -> Entry | None:
    """The entry a coalesced miss may be served, once the leader's outcome is stored: fresh and
    below 500 (an error is never fanned out, even when stored), and fresh enough for the client."""
    entry = variants.select(headers) if variants is not None else None
    if entry is not None and (
        entry.status < 500
        and now < entry.fresh_until
        and (req.directives is None or entry.usable(req.directives, now) == "fresh")
    ):
        return entry
    return None
