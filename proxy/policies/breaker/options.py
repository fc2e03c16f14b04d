"""Circuit breaker settings: the route's `circuit_breaker:` section (Resilience4j's model)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import Field, PlainSerializer, PlainValidator, WithJsonSchema, model_validator

from proxy.kernel.classify import GRPC_CONDITIONS
from proxy.kernel.reasons import TRY_FAULTS
from proxy.options.base import Count, PolicyModel, Text, keep_ordered
from proxy.options.units import (
    DURATION_PATTERN,
    Duration,
    Percent,
    describe_value,
    format_duration,
    parse_duration,
    policy_error,
)

MAX_WINDOW_CALLS = 10_000


@dataclass(frozen=True, slots=True)
class WindowValue:
    """A sliding window: the last ``calls`` calls, or the calls of the last ``seconds``."""

    calls: int | None = None
    seconds: float | None = None

    def __str__(self) -> str:
        return str(self.calls) if self.calls is not None else format_duration(self.seconds or 0)


def _parse_window(value: Any) -> WindowValue:
    if isinstance(value, WindowValue):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        if not 1 <= value <= MAX_WINDOW_CALLS:
            raise policy_error(f"a count window holds 1 to {MAX_WINDOW_CALLS} calls, not {value}")
        return WindowValue(calls=value)
    if isinstance(value, str):
        if value.isdigit():
            return _parse_window(int(value))
        seconds = parse_duration(value)
        if seconds < 1:
            raise policy_error(f"{describe_value(value)}: a time window must be at least 1s")
        return WindowValue(seconds=seconds)
    raise policy_error(
        f"expected a number of calls (like 20) or a duration (like 30s), got {describe_value(value)}"
    )


def _serialize_window(value: WindowValue) -> int | str:
    return value.calls if value.calls is not None else format_duration(value.seconds or 0)


Window = Annotated[
    WindowValue,
    PlainValidator(_parse_window),
    PlainSerializer(_serialize_window),
    WithJsonSchema(
        {
            "oneOf": [
                {"type": "integer", "minimum": 1, "maximum": MAX_WINDOW_CALLS},
                {"type": "string", "pattern": DURATION_PATTERN},
            ],
            "examples": [20, "30s"],
        }
    ),
]


def _check_failure_class(value: Any) -> str:
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        raise policy_error(f"expected a failure class like 5xx, 503 or timeout, got {describe_value(value)}")
    if value in ("5xx", "4xx") or value in TRY_FAULTS or value in GRPC_CONDITIONS:
        return value
    if value.isdigit() and 400 <= int(value) <= 599:
        return value
    raise policy_error(
        f"{describe_value(value)} is not a failure class (use 5xx, 4xx, a status from 400 to 599, "
        f"one of {', '.join(TRY_FAULTS)}, or a gRPC status like unavailable)"
    )


FailureClass = Annotated[
    str,
    PlainValidator(_check_failure_class),
    WithJsonSchema({"oneOf": [{"type": "string"}, {"type": "integer", "minimum": 400, "maximum": 599}]}),
]


class FallbackOptions(PolicyModel):
    """The answer an open breaker gives instead of Fender's 503."""

    status: Count = Field(default=503, ge=200, le=599, description="Status code of the fallback answer.")
    body: Text = Field(
        default="", max_length=65536, description="Body of the fallback answer (at most 64KiB)."
    )
    content_type: Text = Field(
        default="text/plain; charset=utf-8", description="Content-Type of the fallback answer."
    )


class BreakerOptions(PolicyModel):
    """Circuit breaker settings (Resilience4j's model; see docs/policies.md)."""

    consecutive_failures: Count = Field(
        default=5,
        ge=0,
        description="Open after this many failures in a row, whatever the window says. 0 turns the rule off.",
    )
    failure_rate: Percent = Field(
        default="50%",
        validate_default=True,
        description="Open when this share of the calls in the window failed (once minimum_calls are in it).",
    )
    slow_call_duration: Annotated[Duration | None, Field(gt=0)] = Field(
        default=None,
        description="Calls whose response head took longer than this count as slow. Unset: no slow-call rule.",
    )
    slow_call_rate: Percent = Field(
        default="100%",
        validate_default=True,
        description="Open when this share of the calls in the window were slow (needs slow_call_duration).",
    )
    window: Window = Field(
        default=20,
        validate_default=True,
        description="The calls the rates are computed over: a number (the last N calls) or a duration like 30s (time based).",
    )
    minimum_calls: Count = Field(
        default=10,
        ge=1,
        description="Calls needed in the window before the rates are judged, so two failures out of two do not trip it (a smaller count window judges once full).",
    )
    open_for: Annotated[Duration, Field(gt=0)] = Field(
        default="10s",
        validate_default=True,
        description="How long the breaker stays open before letting trial calls through. Doubles on each re-trip.",
    )
    max_open_for: Annotated[Duration, Field(gt=0)] = Field(
        default="5m", validate_default=True, description="Ceiling of open_for's growth."
    )
    half_open_calls: Count = Field(
        default=3,
        ge=1,
        le=1000,
        description="Trial calls allowed while half-open (concurrently and in total); the others fail fast.",
    )
    failure_on: tuple[FailureClass, ...] = Field(
        # bad_response too: an upstream answering garbage (wrong port, broken server) is failing.
        default=(
            "5xx",
            "timeout",
            "connect_failure",
            "connect_timeout",
            "reset",
            "stream_reset",
            "bad_response",
        ),
        description=(
            "What counts as a failure: 5xx or 4xx (upstream status classes), a status like 503, or a fault: "
            + ", ".join(TRY_FAULTS)
            + " (connect_failure includes tls_failure); or a gRPC status of a trailers-only answer (unavailable, "
            "internal, deadline_exceeded...). Other upstream answers count as successes; Fender's own answers "
            "(rate limit, bulkhead) are not counted."
        ),
    )
    scope: Literal["upstream", "route"] = Field(
        default="upstream",
        description="upstream: one breaker per upstream, shared by routes with the same settings; route: one per route.",
    )
    fallback: FallbackOptions | None = Field(
        default=None,
        description="Answer to give while open instead of Fender's 503 breaker_open (a fresh-enough cached answer wins when the route has a cache).",
    )

    @model_validator(mode="after")
    def _max_open(self) -> BreakerOptions:
        keep_ordered(
            self,
            "open_for",
            "max_open_for",
            f"max_open_for ({format_duration(self.max_open_for)}) cannot be shorter than open_for "
            f"({format_duration(self.open_for)})",
            "max_open_for",
        )
        return self
