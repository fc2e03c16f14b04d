"""GCRA, the generic cell rate algorithm: one limit's bucket table, per key, in integer time."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import ItemsView
from typing import Any

from proxy.policies.ratelimit.options import RateLimitOptions, period_of

NS = 1_000_000_000
# Header values longer than this are keyed by a 16-byte digest, so a key costs
# at most this many bytes whatever clients send.
MAX_KEY_BYTES = 64
# Cold entries examined for idle expiry on each new key (amortised O(1)).
EXPIRE_SCAN = 2
MISSING = b"\x00missing"


class Limiter:
    """One limit's bucket table: GCRA per key, integer time in units of 1/count ns.

    ``check(key, now_ns)`` says whether a request would pass without changing
    anything; ``commit`` then consumes. Splitting the two lets a route check
    all its limits before consuming from any (a request refused by the second
    limit does not use up the first one's tokens). Both are synchronous, so on
    the event loop nothing can come between them.
    """

    __slots__ = ("count", "period_ns", "burst", "max_keys", "_step", "_tau", "_table")

    def __init__(self, count: int, period_ns: int, burst: int, max_keys: int) -> None:
        self.count = count
        self.period_ns = period_ns
        self.burst = burst
        self.max_keys = max_keys
        self._step = period_ns  # emission interval P/C ns == P units of 1/C ns
        self._tau = (burst - 1) * period_ns  # tolerance (B-1)*P/C ns
        self._table: OrderedDict[Any, int] = OrderedDict()

    @classmethod
    def from_options(cls, options: RateLimitOptions) -> Limiter:
        period_ns = max(1, round(period_of(options.rate) * NS))
        assert options.burst is not None  # filled in by RateLimitOptions when left out
        return cls(options.rate.count, period_ns, options.burst, options.max_keys)

    def __len__(self) -> int:
        return len(self._table)

    def check(self, key: Any, now_ns: int) -> int:
        """0 when a request for ``key`` at ``now_ns`` passes, else the wait in scaled units (> 0)."""
        tat = self._table.get(key)
        if tat is None:
            return 0
        wait = tat - self._tau - now_ns * self.count
        return wait if wait > 0 else 0

    def take(self, key: Any, now_ns: int, enforce: bool = True) -> int:
        """``check`` and ``commit`` in one lookup: the new TAT (scaled, > 0), or 0 when refused.

        With ``enforce`` False the request is consumed even over the limit (``commit``).
        """
        table = self._table
        now = now_ns * self.count
        tat = table.get(key)
        if tat is None:
            if len(table) >= self.max_keys:
                table.popitem(last=False)
            else:
                self._expire(now)
            tat = now + self._step
        else:
            if enforce and tat - self._tau - now > 0:
                return 0
            tat = (tat if tat > now else now) + self._step
            table.move_to_end(key)
        table[key] = tat
        return tat

    def commit(self, key: Any, now_ns: int) -> int:
        """Consume one request for ``key``; returns the new TAT (scaled)."""
        return self.take(key, now_ns, enforce=False)

    def _expire(self, now: int) -> None:
        # A bucket that refilled completely equals a fresh one: drop it from the cold end.
        table = self._table
        for _ in range(EXPIRE_SCAN):
            if not table:
                return
            key, tat = next(iter(table.items()))
            if tat > now:
                return
            del table[key]

    def remaining(self, key: Any, now_ns: int) -> int:
        """Requests ``key`` could send right now (the ``r`` of the RateLimit header)."""
        tat = self._table.get(key)
        now = now_ns * self.count
        used = tat - now if tat is not None and tat > now else 0
        return max(0, (self.burst * self._step - used) // self._step)

    def reset_seconds(self, key: Any, now_ns: int) -> int:
        """Whole seconds (rounded up) until ``key``'s bucket is full again (the ``t`` parameter)."""
        tat = self._table.get(key)
        now = now_ns * self.count
        if tat is None or tat <= now:
            return 0
        return -(-(tat - now) // (self.count * NS))

    def wait_seconds(self, wait_scaled: int) -> int:
        """A ``check`` result as whole seconds for Retry-After (rounded up, at least 1)."""
        return max(1, -(-wait_scaled // (self.count * NS)))

    def items(self) -> ItemsView[Any, int]:
        return self._table.items()
