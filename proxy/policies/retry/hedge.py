"""Hedged requests: when a try is slow to answer, a second one to another replica races it.

The mechanism of a route's ``hedge:`` section, run by the retry layer (a hedge is a retry
that does not wait for the first try to fail, so it shares the retry layer's rules: the same
idempotency and replay checks, the retry budget, the deadline, per-try timeouts):

* :class:`LatencyEstimate`, a streaming percentile of the route's response-head times in fixed
  memory (log-spaced buckets whose counts decay, so it follows the upstream as it changes);
* :class:`Hedger`, the per-route state: the delay after which a try gets a hedge (the estimate's
  percentile or a fixed duration), the hedge budget (a share of requests, over a window), the
  counts the metrics and the status page show.

Knows nothing of HTTP; the race itself is in :mod:`proxy.policies.retry.layer`.
"""

from __future__ import annotations

import math

from proxy.clock import Clock
from proxy.policies.retry.budget import BudgetOptions, RetryBudget
from proxy.policies.retry.options import HedgeOptions, percentile_of

# Buckets from 100us growing by 15% each: 0.1ms .. ~60s in 96 buckets, so a percentile read
# from a bucket's upper edge is at most 15% above the true one. Past the last bucket, the last.
_LOWEST = 1e-4
_GROWTH = 1.15
_BUCKETS = 96
_INV_LOG_GROWTH = 1 / math.log(_GROWTH)
# Counts halve each time this many tries have been seen since the last halving: the estimate
# weighs the last few thousand tries, and a change of the upstream shows within ~1000.
_HALF_LIFE = 1000
# The percentile is recomputed every this many observations (a walk over 96 buckets).
_RECOMPUTE = 16
# No percentile hedging before this many tries were seen (the first ones say little).
MIN_SAMPLES = 20
# The window of the hedge budget (the retry budget's default).
BUDGET_WINDOW = 10.0


class LatencyEstimate:
    """A percentile of recent durations in fixed memory (96 floats), updated per observation."""

    __slots__ = ("quantile", "_counts", "_total", "_seen", "_since_halving", "_since_compute", "_value")

    def __init__(self, quantile: float) -> None:
        self.quantile = quantile
        self._counts = [0.0] * _BUCKETS
        self._total = 0.0
        self._seen = 0  # observations ever
        self._since_halving = 0
        self._since_compute = 0
        self._value: float | None = None

    def observe(self, seconds: float) -> None:
        if seconds > _LOWEST:
            index = int(math.log(seconds / _LOWEST) * _INV_LOG_GROWTH)
            if index >= _BUCKETS:
                index = _BUCKETS - 1
        else:
            index = 0
        self._counts[index] += 1.0
        self._total += 1.0
        self._seen += 1
        self._since_halving += 1
        if self._since_halving >= _HALF_LIFE:
            self._since_halving = 0
            self._counts = [c * 0.5 for c in self._counts]
            self._total *= 0.5
        self._since_compute += 1
        if self._since_compute >= _RECOMPUTE or (self._value is None and self._seen >= MIN_SAMPLES):
            self._since_compute = 0
            self._value = self._compute()

    def _compute(self) -> float | None:
        if self._seen < MIN_SAMPLES:
            return None  # too few tries seen yet
        wanted = self.quantile * self._total
        running = 0.0
        for index, count in enumerate(self._counts):
            running += count
            if running >= wanted:
                return _LOWEST * _GROWTH ** (index + 1)  # the bucket's upper edge
        return _LOWEST * _GROWTH**_BUCKETS

    @property
    def value(self) -> float | None:
        """The percentile in seconds (a bucket's upper edge), or None before ``MIN_SAMPLES`` tries."""
        return self._value

    @property
    def samples(self) -> float:
        return self._total


class Hedger:
    """A route's hedging state: when to hedge, whether the hedge budget allows it, what happened."""

    __slots__ = ("route", "max_extra", "fixed", "estimate", "budget", "sent", "won", "skipped", "after")

    def __init__(self, route: str, options: HedgeOptions, clock: Clock) -> None:
        self.route = route
        self.after = options.after
        self.max_extra = options.max_extra
        quantile = percentile_of(options.after)
        # A fixed delay, or None when the delay follows the estimate.
        self.fixed: float | None = None if quantile is not None else float(options.after)
        self.estimate = LatencyEstimate(quantile) if quantile is not None else None
        # Requests deposit, hedges withdraw: hedges <= budget x requests over the window.
        budget = BudgetOptions.model_validate(
            {"ratio": f"{options.budget * 100:g}%", "min_per_second": 0, "window": "10s"}
        )
        self.budget = RetryBudget(budget, clock)
        self.sent = 0
        self.won = 0  # races a hedge won (the rest the first try won)
        self.skipped = 0

    def delay(self) -> float | None:
        """Seconds after which a try gets a hedge, or None (not enough tries seen yet)."""
        if self.fixed is not None:
            return self.fixed
        return self.estimate.value  # type: ignore[union-attr]

    def observe(self, seconds: float) -> None:
        """A try's time to its response head (or, for a cancelled loser, the time it had run)."""
        if self.estimate is not None:
            self.estimate.observe(seconds)

    def snapshot(self) -> dict[str, object]:
        """What the status page shows of this route's hedging."""
        delay = self.delay()
        return {
            "after": self.after if isinstance(self.after, str) else f"{self.after * 1000:g}ms",
            "delay_seconds": None if delay is None else round(delay, 6),
            "sent": self.sent,
            "won": self.won,
            "skipped": self.skipped,
        }
