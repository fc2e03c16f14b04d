"""Leases of a global rate limit's tokens: a sidecar takes a batch from the fleet bucket, spends it locally.

One lease per (limit, key value) in this sidecar, in a bounded LRU table. A
lease holds ``tokens`` taken from the fleet's GCRA bucket in Redis (one script
call takes a batch) until ``expires``; tokens not spent by then are dropped
(they stay consumed in Redis: a quiet or dead sidecar never gives the fleet
more, it can only have taken up to one lease of tokens nobody uses).

The batch asked for adapts to this sidecar's own demand for the key: the
requests seen since the last renewal, per second, times the lease time,
between 1 and ``max_batch`` (a fraction of the burst). A key this sidecar sees
rarely leases one token at a time, which is the exact path's cost and
accuracy. When the fleet bucket had fewer tokens than asked, the script also
says when the next one is due (``next_at``): until then the bucket is empty
for every sidecar, so an empty lease refuses without asking Redis.

The clock is injected (``proxy/clock.py``); times are its seconds.
"""

from __future__ import annotations

import asyncio
import math
from collections import OrderedDict
from collections.abc import Hashable

from proxy.clock import Clock

# Shortest interval a demand estimate divides by (requests arriving together do not make it infinite).
MIN_ELAPSED = 0.001


class Lease:
    """This sidecar's tokens for one key of one global limit."""

    __slots__ = ("tokens", "expires", "demand", "since", "next_at", "size", "renewal", "used", "used_at")

    def __init__(self, now: float) -> None:
        self.tokens = 0
        self.expires = 0.0
        self.demand = 0  # requests that wanted a token since the last renewal
        self.since = now  # when that count started
        self.next_at = 0.0  # the fleet bucket's next token (when the last renewal came back short)
        self.size = 1  # the batch last asked for
        self.renewal: asyncio.Task[None] | None = None  # the renewal in flight, if any
        self.used = 0  # the fleet bucket's TAT - now (us) at the last renewal, for the RateLimit header
        self.used_at = now


class LeaseTable:
    """The leases of one global limit: sizing and spending, no I/O (the caller talks to Redis)."""

    __slots__ = ("clock", "lease_time", "max_batch", "max_keys", "_leases")

    def __init__(self, clock: Clock, lease_time: float, max_batch: int, max_keys: int) -> None:
        self.clock = clock
        self.lease_time = lease_time
        self.max_batch = max(1, max_batch)
        self.max_keys = max_keys
        self._leases: OrderedDict[Hashable, Lease] = OrderedDict()

    def __len__(self) -> int:
        return len(self._leases)

    def get(self, key: Hashable) -> Lease:
        """The lease of ``key`` (a new, empty one the first time), as the most recently used."""
        leases = self._leases
        lease = leases.get(key)
        if lease is None:
            if len(leases) >= self.max_keys:
                leases.popitem(last=False)
            lease = leases[key] = Lease(self.clock.now())
        else:
            leases.move_to_end(key)
        return lease

    def available(self, lease: Lease, now: float) -> int:
        """Tokens ``lease`` can spend at ``now`` (none once it expired)."""
        if lease.tokens and now >= lease.expires:
            lease.tokens = 0
        return lease.tokens

    def want(self, lease: Lease, now: float) -> int:
        """The batch to ask for: demand per second since the last renewal x lease time, in 1..max_batch."""
        rate = lease.demand / max(now - lease.since, MIN_ELAPSED)
        size = min(self.max_batch, max(1, math.ceil(rate * self.lease_time)))
        return max(1, size - lease.tokens)

    def granted(self, lease: Lease, asked: int, got: int, next_wait: float, used_us: int, now: float) -> None:
        """A renewal's answer: ``got`` of ``asked`` tokens; the next fleet token in ``next_wait`` s."""
        lease.size = asked + lease.tokens
        lease.tokens += got
        lease.expires = now + self.lease_time
        lease.demand = 0
        lease.since = now
        lease.next_at = now + next_wait if got < asked else 0.0
        lease.used = used_us
        lease.used_at = now

    def low(self, lease: Lease) -> bool:
        """Time to renew in the background: a quarter of the batch or less is left (batches above 1)."""
        return lease.size > 1 and lease.tokens * 4 <= lease.size and lease.renewal is None

    def held(self) -> int:
        """Tokens held in unexpired leases (the admin API; the README's bound)."""
        now = self.clock.now()
        return sum(lease.tokens for lease in self._leases.values() if now < lease.expires)
