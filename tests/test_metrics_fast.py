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
