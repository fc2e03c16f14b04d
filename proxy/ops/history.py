"""Recent per-route traffic for the status page: a bounded ring buffer of metric readings.

Nothing here runs per request. Every ``interval`` seconds a background task
reads the cumulative Prometheus metric values the data path already keeps
(``fender_requests_total``, ``fender_request_duration_seconds``, rate-limit,
bulkhead and retry counters) into one :class:`Reading`; the buffer keeps the
last ``span`` seconds of them (5 minutes by default). Rates, error ratios and
latency quantiles are differences between two readings, computed when the
admin API asks:

* request rate: requests answered per second (local answers included);
* error rate: share of those answered with a 5xx status (Fender's own 502/503/504 included);
* p50/p99: estimated from the latency histogram's bucket counts the way
  Prometheus' ``histogram_quantile`` does (linear within the bucket), so the
  value is only as fine as the buckets (proxy/metrics.py ``LATENCY_BUCKETS``).

Memory: ``span / interval + 1`` readings of a few numbers per route.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections import deque
from dataclasses import dataclass, field

from prometheus_client.utils import floatToGoString

from proxy.clock import Clock
from proxy.metrics import LATENCY_BUCKETS, Metrics

log = logging.getLogger("fender")

SAMPLE_INTERVAL = 5.0  # seconds between readings
HISTORY_SPAN = 300.0  # seconds of readings kept (sparklines)
SUMMARY_WINDOW = 60.0  # seconds the route summary covers ("over the last minute")

_BOUNDS = (*LATENCY_BUCKETS, math.inf)


@dataclass(slots=True)
class RouteReading:
    """Cumulative counts of one route at one moment."""

    requests: float = 0.0
    errors: float = 0.0
    buckets: list[float] = field(default_factory=lambda: [0.0] * len(_BOUNDS))  # cumulative, by bound
    rate_limited: float = 0.0
    bulkhead_rejected: float = 0.0
    retries: float = 0.0


@dataclass(slots=True)
class Reading:
    at: float
    routes: dict[str, RouteReading]


def read_metrics(metrics: Metrics, at: float) -> Reading:
    """One reading of the cumulative per-route values (a walk over the metric families' children)."""
    routes: dict[str, RouteReading] = {}

    def route(name: str) -> RouteReading:
        r = routes.get(name)
        if r is None:
            r = routes[name] = RouteReading()
        return r

    for family in metrics.requests.collect():
        for s in family.samples:
            if s.name.endswith("_total"):
                r = route(s.labels["route"])
                r.requests += s.value
                if s.labels["status_class"] == "5xx":
                    r.errors += s.value
    index = {_label(b): i for i, b in enumerate(_BOUNDS)}
    for family in metrics.request_duration.collect():
        for s in family.samples:
            if s.name.endswith("_bucket"):
                i = index.get(s.labels["le"])
                if i is not None:
                    route(s.labels["route"]).buckets[i] = s.value
    for family in metrics.ratelimit_requests.collect():
        for s in family.samples:
            if s.name.endswith("_total") and s.labels["decision"] == "limited":
                route(s.labels["route"]).rate_limited += s.value
    for family in metrics.bulkhead_rejected.collect():
        for s in family.samples:
            if s.name.endswith("_total"):
                route(s.labels["route"]).bulkhead_rejected += s.value
    for family in metrics.retries.collect():
        for s in family.samples:
            if s.name.endswith("_total"):
                route(s.labels["route"]).retries += s.value
    return Reading(at, routes)


def _label(bound: float) -> str:
    return floatToGoString(bound)  # how prometheus_client writes the ``le`` label


def quantile(q: float, buckets: list[float]) -> float | None:
    """``histogram_quantile(q, ...)`` over cumulative bucket counts aligned with ``LATENCY_BUCKETS`` + Inf."""
    total = buckets[-1]
    if total <= 0:
        return None
    rank = q * total
    lower_bound = 0.0
    lower_count = 0.0
    for bound, count in zip(_BOUNDS, buckets, strict=True):
        if count >= rank:
            if bound == math.inf:
                return LATENCY_BUCKETS[-1]  # above the last finite bucket: its bound is all we know
            if count == lower_count:
                return bound
            return lower_bound + (bound - lower_bound) * (rank - lower_count) / (count - lower_count)
        lower_bound, lower_count = bound, count
    return LATENCY_BUCKETS[-1]


def summarise(old: RouteReading | None, new: RouteReading, seconds: float) -> dict:
    """Rates between two readings of one route (``old`` None: the route is new, count from zero)."""
    old = old or RouteReading()
    requests = max(new.requests - old.requests, 0.0)
    errors = max(new.errors - old.errors, 0.0)
    buckets = [max(n - o, 0.0) for n, o in zip(new.buckets, old.buckets, strict=True)]
    p50 = quantile(0.5, buckets)
    p99 = quantile(0.99, buckets)
    return {
        "requests": int(requests),
        "rate_per_second": round(requests / seconds, 3) if seconds > 0 else None,
        "error_rate": round(errors / requests, 4) if requests else None,
        "p50_seconds": None if p50 is None else round(p50, 6),
        "p99_seconds": None if p99 is None else round(p99, 6),
        "rate_limited": int(max(new.rate_limited - old.rate_limited, 0.0)),
        "bulkhead_rejected": int(max(new.bulkhead_rejected - old.bulkhead_rejected, 0.0)),
        "retries": int(max(new.retries - old.retries, 0.0)),
    }


class TrafficHistory:
    """The ring buffer and the task that fills it; started and stopped with :class:`~proxy.server.fender.Fender`."""

    def __init__(
        self,
        metrics: Metrics,
        clock: Clock,
        interval: float = SAMPLE_INTERVAL,
        span: float = HISTORY_SPAN,
        ticker: Clock | None = None,
    ) -> None:
        self.metrics = metrics
        self.clock = clock  # time stamps of the readings
        # What the sampler sleeps on (``clock`` unless given). Fender passes the system clock so the
        # sampler is not among a test's ManualClock sleepers (tests count those to see a layer wait).
        self.ticker = ticker or clock
        self.interval = interval
        self.span = span
        self.readings: deque[Reading] = deque(maxlen=int(math.ceil(span / interval)) + 1)
        self._task: asyncio.Task | None = None

    def sample(self) -> Reading:
        reading = read_metrics(self.metrics, self.clock.now())
        self.readings.append(reading)
        return reading

    async def _run(self) -> None:
        while True:
            await self.ticker.sleep(self.interval)
            if self.readings and self.clock.now() <= self.readings[-1].at:
                continue  # the clock has not moved (a stopped test clock): nothing to difference
            try:
                self.sample()
            except Exception:  # pragma: no cover - a bad reading must not end the sampler
                log.exception("status history: reading the metrics failed")

    def start(self) -> None:
        if self._task is None:
            self.sample()  # the baseline: rates are differences from here
            self._task = asyncio.ensure_future(self._run())

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass

    def routes(self, names: list[str], window: float = SUMMARY_WINDOW) -> dict[str, dict]:
        """Per route: the summary over about the last ``window`` seconds (up to now) and the sparklines.

        The summary compares a fresh reading with the newest buffered reading at least ``window`` old
        (the oldest one while the buffer is younger than that); ``window_seconds`` says what it covered.
        """
        now = read_metrics(self.metrics, self.clock.now())
        readings = list(self.readings)
        base = None
        for reading in readings:
            if now.at - reading.at >= window - 1e-9 or base is None:
                base = reading
            else:
                break
        out = {}
        for name in names:
            new = now.routes.get(name) or RouteReading()
            if base is None:
                summary = summarise(new, new, 0.0)
                seconds = 0.0
            else:
                seconds = now.at - base.at
                summary = summarise(base.routes.get(name), new, seconds)
            summary["window_seconds"] = round(seconds, 3)
            summary["history"] = self._series(name, readings)
            out[name] = summary
        return out

    @staticmethod
    def _series(name: str, readings: list[Reading]) -> dict:
        """Request rate and error rate between consecutive readings (oldest first)."""
        rate: list[float] = []
        errors: list[float | None] = []
        for old, new in zip(readings, readings[1:], strict=False):
            a = old.routes.get(name) or RouteReading()
            b = new.routes.get(name) or RouteReading()
            seconds = new.at - old.at
            requests = max(b.requests - a.requests, 0.0)
            rate.append(round(requests / seconds, 3) if seconds > 0 else 0.0)
            errors.append(round(max(b.errors - a.errors, 0.0) / requests, 4) if requests else None)
        return {"rate_per_second": rate, "error_rate": errors}
