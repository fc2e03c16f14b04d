"""The request-path metric helpers produce exactly the samples prometheus-client's own methods do."""

from __future__ import annotations

import math

import pytest

from proxy.metrics import FastCounter, FastHistogram, Metrics


def _samples(metric, route: str) -> list[tuple[str, str | None, float]]:
    return [
        (s.name, s.labels.get("le"), s.value)
        for s in metric.collect()[0].samples
        if s.labels.get("route") == route
    ]


def test_fast_histogram_matches_histogram_observe_on_bounds_and_between():
    metrics = Metrics()
    plain = metrics.request_duration.labels("plain")
    fast = FastHistogram(metrics.request_duration.labels("fast"))
    bounds = [b for b in plain._upper_bounds if b != math.inf]
    values = [0.0, -1.0, *bounds, *(b * 1.0001 for b in bounds), *(b * 0.9999 for b in bounds), 1e9]
    for value in values:
        plain.observe(value)
        fast.observe(value)
    expected = _samples(metrics.request_duration, "plain")
    assert _samples(metrics.request_duration, "fast") == expected
    # every value landed in some bucket: the +Inf bucket counts them all
    assert expected[len(bounds)][2] == len(values)


def test_fast_histogram_ignores_nan_in_buckets_like_histogram():
    metrics = Metrics()
    plain = metrics.request_duration.labels("plain")
    fast = FastHistogram(metrics.request_duration.labels("fast"))
    plain.observe(math.nan)
    fast.observe(math.nan)
    buckets = [v for name, _, v in _samples(metrics.request_duration, "fast") if name.endswith("_bucket")]
    assert buckets == [
        v for name, _, v in _samples(metrics.request_duration, "plain") if name.endswith("_bucket")
    ]
    assert sum(buckets) == 0


def test_fast_counter_counts_like_counter_inc():
    metrics = Metrics()
    plain = metrics.requests.labels("plain", "GET", "2xx")
    fast = FastCounter(metrics.requests.labels("fast", "GET", "2xx"))
    for _ in range(3):
        plain.inc()
        fast.inc()
    values = {s.labels["route"]: s.value for s in metrics.requests.collect()[0].samples}
    assert values == {"plain": 3.0, "fast": 3.0}


def test_fast_helpers_refuse_a_parent_without_labels():
    metrics = Metrics()
    with pytest.raises(ValueError):
        FastCounter(metrics.requests)
    with pytest.raises(ValueError):
        FastHistogram(metrics.request_duration)


def test_fast_counter_and_counter_inc_add_up_on_one_child():
    # FastCounter counts in C-level ticks beside the float value Counter.inc adds to; a scrape sums both.
    metrics = Metrics()
    child = metrics.requests.labels("mixed", "GET", "2xx")
    fast = FastCounter(child)
    for _ in range(5):
        fast.inc()
    child.inc(2.5)
    fast.inc()
    values = {s.labels["route"]: s.value for s in metrics.requests.collect()[0].samples}
    assert values == {"mixed": 8.5}


def test_gauge_set_is_exact_after_fast_increments_on_its_value():
    # set() must override whatever the ticks counted (gauges share the value class).
    metrics = Metrics()
    gauge = metrics.draining
    for _ in range(4):
        gauge._value.ticks.__next__()
    gauge.set(1)
    assert metrics.registry.get_sample_value("fender_draining") == 1
    gauge.inc()
    assert metrics.registry.get_sample_value("fender_draining") == 2


def test_the_private_surface_of_prometheus_client_fender_relies_on_is_there():
    # proxy/metrics.py reads these private parts of prometheus-client (pinned below 0.27 in
    # pyproject.toml); a release that renames or reshapes one fails here, not in production.
    from itertools import count

    from prometheus_client import values

    from proxy.metrics import _LoopValue, _ticks_of

    assert values.ValueClass is _LoopValue  # installed over MutexValue at import
    assert hasattr(values, "MutexValue")
    metrics = Metrics()
    child = metrics.request_duration.labels("r")
    child._raise_if_not_observable()  # a child with its labels passes
    assert isinstance(child._sum, _LoopValue)
    assert len(child._buckets) == len(child._upper_bounds) and child._upper_bounds[-1] == math.inf
    assert all(isinstance(b, _LoopValue) for b in child._buckets)
    counter = metrics.no_route.labels() if metrics.no_route._labelnames else metrics.no_route
    assert isinstance(counter._value, _LoopValue)
    with pytest.raises(ValueError):
        metrics.request_duration._raise_if_not_observable()  # the parent lacks its labels
    # _ticks_of reads CPython's repr of itertools.count ("count(N)")
    ticks = count()
    for _ in range(12345):
        next(ticks)
    assert _ticks_of(ticks) == 12345
