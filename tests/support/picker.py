"""Picker tests' helpers: pickers built from a policy text on a ManualClock, and pick counts."""

from __future__ import annotations

import textwrap
from collections import Counter

from proxy.clock import ManualClock
from proxy.cluster.upstream import UpstreamRuntime
from proxy.config import parse_policy
from proxy.metrics import Metrics


def policy_for(upstream_yaml: str) -> str:
    return (
        "listen: 127.0.0.1:0\nadmin: 127.0.0.1:0\nupstreams:\n  svc:\n"
        + textwrap.indent(textwrap.dedent(upstream_yaml), "    ")
        + "routes:\n  - {name: all, upstream: svc}\n"
    )


def build(upstream_yaml: str, clock: ManualClock | None = None, metrics: Metrics | None = None):
    policy = parse_policy(policy_for(upstream_yaml), "test.yaml")
    clock = clock or ManualClock()
    return UpstreamRuntime("svc", policy.upstreams["svc"], metrics or Metrics(), clock), clock


def picks(up: UpstreamRuntime, n: int) -> Counter:
    return Counter(up.choose(None).port for _ in range(n))


def sample(metrics: Metrics, name: str, **labels) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value
