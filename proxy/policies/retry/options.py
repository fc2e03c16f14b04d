"""Retry settings: the route's `retry:` section (conditions, methods, backoff, budget)."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import Field, PlainValidator, WithJsonSchema

from proxy.kernel.classify import GRPC_CONDITIONS
from proxy.kernel.reasons import KNOWN_METHODS, TRY_FAULTS
from proxy.options.base import Count, Flag, PolicyModel
from proxy.options.units import Duration, Size, describe_value, policy_error
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
