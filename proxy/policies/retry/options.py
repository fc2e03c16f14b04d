"""Retry settings: the route's `retry:` section (conditions, methods, backoff, budget) and `hedge:`."""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import Field, PlainSerializer, PlainValidator, WithJsonSchema

from proxy.kernel.classify import GRPC_CONDITIONS
from proxy.kernel.reasons import KNOWN_METHODS, TRY_FAULTS
from proxy.options.base import Count, Flag, PolicyModel
from proxy.options.units import (
    DURATION_PATTERN,
    Duration,
    Percent,
    Size,
    describe_value,
    format_duration,
    parse_duration,
    policy_error,
)
from proxy.policies.retry.backoff import BackoffOptions
from proxy.policies.retry.budget import BudgetOptions

STATUS_CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx")


def _check_condition(value: Any) -> str:
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        raise policy_error(f"expected a retry condition like 503 or reset, got {describe_value(value)}")
    if value in TRY_FAULTS or value in ("5xx", "gateway_error") or value in GRPC_CONDITIONS:
        return value
    if value.isdigit() and 400 <= int(value) <= 599:
        return value
    raise policy_error(
        f"{describe_value(value)} is not a retry condition (use a status from 400 to 599, 5xx, "
        f"gateway_error (502, 503, 504), one of {', '.join(TRY_FAULTS)}, or a gRPC status like unavailable)"
    )


RetryCondition = Annotated[
    str,
    PlainValidator(_check_condition),
    WithJsonSchema({"oneOf": [{"type": "string"}, {"type": "integer", "minimum": 400, "maximum": 599}]}),
]


def _check_method(value: Any) -> str:
    if not isinstance(value, str) or value.upper() not in KNOWN_METHODS:
        raise policy_error(f"{describe_value(value)} is not an HTTP method ({', '.join(KNOWN_METHODS)})")
    return value.upper()


RetryMethod = Annotated[
    str, PlainValidator(_check_method), WithJsonSchema({"type": "string", "enum": list(KNOWN_METHODS)})
]


class RetryOptions(PolicyModel):
    """When and how often a failed try is made again."""

    attempts: Count = Field(
        default=3, ge=1, le=10, description="Total tries including the first; 1 turns retries off."
    )
    per_try_timeout: Annotated[Duration | None, Field(gt=0)] = Field(
        default=None,
        description=(
            "Deadline of one try's response head; a slower try is abandoned and may be retried. "
            "Unset: each try may use what is left of the route's timeout."
        ),
    )
    backoff: BackoffOptions = Field(
        default_factory=BackoffOptions, description="Wait between tries: exponential with jitter."
    )
    retry_on: tuple[RetryCondition, ...] = Field(
        default=("connect_failure", "connect_timeout", "reset", "stream_reset", "502", "503", "504"),
        description=(
            "Outcomes that are retried: upstream statuses (503, or 5xx, or gateway_error for 502/503/504), "
            "faults: "
            + ", ".join(TRY_FAULTS)
            + " (connect_failure includes tls_failure); and gRPC statuses of "
            "a trailers-only answer (unavailable, resource_exhausted, deadline_exceeded, internal, cancelled, "
            "unknown...): a call answered with one is retried whatever its method (see docs/grpc.md)."
        ),
    )
    budget: BudgetOptions = Field(
        default_factory=BudgetOptions,
        description="Cap on the extra load retries may add, so a down upstream is not hit harder.",
    )
    methods: tuple[RetryMethod, ...] = Field(
        default=("GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"),
        description=(
            "Methods retried after the request may have reached the upstream. Others (POST, PATCH) are retried "
            "then only with an Idempotency-Key header; any method is retried when nothing was sent (connect failure)."
        ),
    )
    max_replay_body: Annotated[Size, Field(le=16 * 1024 * 1024)] = Field(
        default="64KiB",
        validate_default=True,
        description=(
            "Largest request body kept in memory so it can be sent again; larger (or chunked) bodies stream and "
            "are not retried. At most 16MiB; every request in flight may hold this much."
        ),
    )
    honor_retry_after: Flag = Field(
        default=True,
        description="Wait as long as the upstream's Retry-After asks when that fits in the deadline; else return its answer.",
    )


_PERCENTILE = re.compile(r"^p(\d{1,2}(?:\.\d{1,2})?)$")


def _check_after(value: Any) -> str | float:
    """``p50`` .. ``p99.99`` (the route's observed latency percentile) or a duration such as ``40ms``."""
    if isinstance(value, str):
        match = _PERCENTILE.match(value)
        if match:
            if not 50 <= float(match.group(1)) < 100:
                raise policy_error(f"{value} is not a percentile to hedge after (use p50 to p99.99)")
            return value
        if value[:1] == "p":
            raise policy_error(f"{describe_value(value)} is not a percentile (write p95, p99 or p99.9)")
    seconds = parse_duration(value)
    if seconds <= 0:
        raise policy_error("a hedge delay must be more than 0s")
    return seconds


def _dump_after(value: str | float) -> str:
    return value if isinstance(value, str) else format_duration(value)


HedgeAfter = Annotated[
    str | float,
    PlainValidator(_check_after),
    PlainSerializer(_dump_after, return_type=str),
    WithJsonSchema(
        {
            "type": "string",
            "pattern": r"^(p\d{1,2}(\.\d{1,2})?|" + DURATION_PATTERN.strip("^$") + ")$",
            "examples": ["p95", "p99", "40ms"],
        }
    ),
]


def percentile_of(after: str | float) -> float | None:
    """The quantile (0.95 for ``p95``) a hedge delay follows, or None for a fixed delay."""
    return float(after[1:]) / 100 if isinstance(after, str) else None


class HedgeOptions(PolicyModel):
    """Hedged requests: a second try to another replica when the first is slow to answer."""

    after: HedgeAfter = Field(
        default="p95",
        description=(
            "When a try that has not answered gets a hedge: a percentile of this route's observed response "
            "time (p95: the slowest 5% are hedged; estimated over the recent tries, no hedge before 20 have "
            "been seen) or a fixed duration such as 40ms."
        ),
    )
    max_extra: Count = Field(
        default=1, ge=1, le=3, description="Hedges a request may get at most (each one `after` the previous)."
    )
    budget: Annotated[Percent, Field(gt=0)] = Field(
        default="5%",
        validate_default=True,
        description=(
            "Share of this route's requests that may be hedged, over a 10s window: under a slow upstream "
            "hedging adds at most this much load. Hedges also take from the retry budget and stop when it is spent."
        ),
    )
