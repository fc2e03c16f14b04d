"""A gradient concurrency limit (Netflix concurrency-limits' Gradient2, with a lower-percentile
baseline) and its LIFO queue, on the injected clock. Knows nothing of HTTP.

Every ``interval`` the limit is recomputed from the answers that arrived in it::

    short    = mean response-head time of the interval
    target   = target_latency, or tolerance x no_load
    gradient = clamp(target / short, 0.5, 1)
    new      = limit x gradient + sqrt(limit)          (the headroom lets it probe upward)
    limit    = new, except 0.8 x limit + 0.2 x new when rising under some pressure (gradient < 1);
               within [min, max]

``no_load`` is the no-load latency measured from live traffic: the interval's 10th percentile of
answer times, taken at once when it is lower than what is known and followed slowly (1% per
interval) when higher. No probe ever drops the limit to ``min`` to re-measure it (Envoy's minRTT
window does, with 503 dips). An interval in which the route did not use half of its limit leaves
the limit alone (nothing was learnt about more load).

Beyond the limit a request waits in a bounded queue served newest first (LIFO: under overload
the requests still likely to be wanted go first); when the queue is full the oldest waiter is
shed, and a waiter gives up after ``queue_timeout``.
"""

from __future__ import annotations

import asyncio
import math
from collections import deque

from proxy.clock import Clock
from proxy.policies.adaptive.options import AdaptiveConcurrencyOptions

_SAMPLES = 256  # answer times kept per interval for its percentile (fixed memory)
_BASELINE_RISE = 0.01  # share of the way a higher no-load reading moves the baseline per interval


class Shed(Exception):
    """No slot in time: ``reason`` is queue_full (shed as the oldest) or queue_timeout."""

    def __init__(self, reason: str) -> None:
        self.reason = reason


class GradientLimit:
    """The limit, the requests in flight under it and the queue beyond it."""

    __slots__ = (
        "options",
        "clock",
        "limit",
        "in_flight",
        "no_load",
        "target",
        "last_gradient",
        "shed",
        "_waiters",
        "_samples",
        "_sum",
        "_count",
        "_peak",
        "_interval_end",
        "__weakref__",
    )

    def __init__(self, options: AdaptiveConcurrencyOptions, clock: Clock) -> None:
        self.options = options
        self.clock = clock
        initial = options.initial if options.initial is not None else 20
        self.limit = float(min(max(initial, options.min), options.max))
        self.in_flight = 0
        self.no_load: float | None = None
        self.target: float | None = options.target_latency
        self.last_gradient = 1.0
        self.shed = 0
        self._waiters: deque[asyncio.Future[bool]] = deque()
        self._samples: list[float] = []
        self._sum = 0.0
        self._count = 0
        self._peak = 0  # most requests in flight during this interval
        self._interval_end = clock.now() + options.interval

    @property
    def queued(self) -> int:
        return len(self._waiters)

    def try_acquire(self) -> bool:
        if self.in_flight < int(self.limit):
            self.in_flight += 1
            if self.in_flight > self._peak:
                self._peak = self.in_flight
            return True
        return False

    async def acquire(self, timeout: float) -> float:
        """Wait for a slot (after :meth:`try_acquire` said no); the seconds waited, or :class:`Shed`."""
        options = self.options
        if options.max_queued == 0 or timeout <= 0:
            raise Shed("queue_full" if options.max_queued == 0 else "queue_timeout")
        waiters = self._waiters
        if len(waiters) >= options.max_queued:
            oldest = waiters.popleft()
            if not oldest.done():
                oldest.set_exception(Shed("queue_full"))
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        waiters.append(future)
        started = self.clock.now()

        def expire() -> None:
            if not future.done():
                future.set_exception(Shed("queue_timeout"))
                try:
                    waiters.remove(future)
                except ValueError:
                    pass

        timer = self.clock.call_later(timeout, expire)  # type: ignore[attr-defined]
        try:
            await future  # True: a releasing request handed its slot over (in_flight counts us)
        except asyncio.CancelledError:
            if future.done() and not future.cancelled() and future.exception() is None:
                self.release(None)  # granted, but the client left: give the slot on
            else:
                try:
                    waiters.remove(future)
                except ValueError:
                    pass
            raise
        finally:
            timer.cancel()
        return self.clock.now() - started

    def release(self, seconds: float | None) -> None:
        """A request ends (its response head arrived after ``seconds``, or None: no sample)."""
        self.in_flight -= 1
        now = self.clock.now()
        if seconds is not None:
            self._sum += seconds
            self._count += 1
            samples = self._samples
            if len(samples) < _SAMPLES:
                samples.append(seconds)
            else:
                samples[self._count % _SAMPLES] = seconds
        if now >= self._interval_end:
            self._update(now)
        waiters = self._waiters
        while waiters and self.in_flight < int(self.limit):
            future = waiters.pop()  # newest first
            if not future.done():
                self.in_flight += 1
                if self.in_flight > self._peak:
                    self._peak = self.in_flight
                future.set_result(True)

    def _update(self, now: float) -> None:
        options = self.options
        self._interval_end = now + options.interval
        count, total, samples, peak = self._count, self._sum, self._samples, self._peak
        self._count, self._sum, self._samples, self._peak = 0, 0.0, [], self.in_flight
        if count == 0:
            return
        ordered = sorted(samples)
        low = ordered[len(ordered) // 10]
        if self.no_load is None or low < self.no_load:
            self.no_load = low
        else:
            self.no_load += (low - self.no_load) * _BASELINE_RISE
        target = options.target_latency or options.tolerance * self.no_load
        self.target = target
        if peak < self.limit / 2:
            return  # the route did not press on the limit: nothing learnt about more load
        short = total / count
        gradient = max(0.5, min(1.0, target / short))
        self.last_gradient = gradient
        limit = self.limit
        new = limit * gradient + math.sqrt(limit)
        if gradient < 1.0 and new > limit:
            new = 0.8 * limit + 0.2 * new  # under some pressure: rise with smoothing
        limit = new
        self.limit = min(max(limit, float(options.min)), float(options.max))

    def snapshot(self) -> dict[str, object]:
        return {
            "limit": int(self.limit),
            "in_flight": self.in_flight,
            "queued": self.queued,
            "no_load_seconds": None if self.no_load is None else round(self.no_load, 6),
            "target_seconds": None if self.target is None else round(self.target, 6),
            "shed": self.shed,
        }
