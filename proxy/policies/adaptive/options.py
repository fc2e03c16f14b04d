"""Adaptive concurrency settings: the route's `adaptive_concurrency:` section."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, Strict, model_validator

from proxy.options.base import Count, PolicyModel
from proxy.options.units import Duration, policy_error


class AdaptiveConcurrencyOptions(PolicyModel):
    """A concurrency limit that follows the upstream's latency instead of a fixed number."""

    min: Annotated[Count, Field(ge=1, le=100_000)] = Field(
        default=4, description="The limit never goes below this many requests in flight."
    )
    max: Annotated[Count, Field(ge=1, le=100_000)] = Field(
        default=1000, description="The limit never goes above this many requests in flight."
    )
    initial: Annotated[Count | None, Field(ge=1, le=100_000)] = Field(
        default=None,
        description="The limit at start (and after a reload that changes these settings). Unset: 20, within min and max.",
    )
    target_latency: Annotated[Duration | None, Field(gt=0)] = Field(
        default=None,
        description=(
            "The response-head time the limit aims to hold. Unset: tolerance x the no-load latency, "
            "measured from the lower percentile (p10) of live traffic (no probing at the minimum)."
        ),
    )
    tolerance: Annotated[float, Strict(), Field(ge=1, le=10)] = Field(
        default=2.0,
        description="With target_latency unset: how much slower than the no-load latency answers may get before the limit falls.",
    )
    interval: Annotated[Duration, Field(gt=0, le=60)] = Field(
        default="1s",
        validate_default=True,
        description="How often the limit is recomputed from the answers of the last interval.",
    )
    max_queued: Annotated[Count, Field(ge=0, le=100_000)] = Field(
        default=50,
        description="Requests that may wait for a slot beyond the limit (newest served first, LIFO); when full the oldest is shed.",
    )
    queue_timeout: Annotated[Duration, Field(ge=0)] = Field(
        default="100ms",
        validate_default=True,
        description="Longest wait for a slot; then 503 concurrency_limited.",
    )

    @model_validator(mode="after")
    def _ordered(self) -> AdaptiveConcurrencyOptions:
        if self.min > self.max:
            raise policy_error(f"max ({self.max}) must be at least min ({self.min})", "max")
        if self.initial is not None and not self.min <= self.initial <= self.max:
            raise policy_error(f"initial ({self.initial}) must lie between min and max", "initial")
        return self
