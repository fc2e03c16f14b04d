"""Backoff between retries: exponential growth with a choice of jitter.

The jitter modes are the ones compared in the AWS Architecture Blog post
"Exponential Backoff And Jitter" (Marc Brooker, 2015); Envoy uses full jitter:

* ``none``: ``d = min(max, initial * multiplier ** (n - 1))``
* ``full``: uniform in ``[0, d]`` (Envoy's choice; spreads retries the most)
* ``equal``: ``d / 2`` plus uniform in ``[0, d / 2]`` (never retries at once)
* ``decorrelated``: uniform in ``[initial, previous * 3]``, capped at ``max``
  (the growth factor 3 is the blog's; ``multiplier`` does not apply)

The caller (the retry layer) bounds each sleep by the request's deadline.
"""

from __future__ import annotations

import random
from typing import Annotated, Literal

from pydantic import Field, Strict, model_validator

from proxy.options.base import PolicyModel, keep_ordered
from proxy.options.units import Duration, format_duration

JITTER_MODES = ("full", "equal", "decorrelated", "none")


class BackoffOptions(PolicyModel):
    """How long to wait before each retry."""

    initial: Annotated[Duration, Field(gt=0)] = Field(
        default="25ms",
        validate_default=True,
        description="Base wait before the first retry (Envoy's default base interval is 25ms).",
    )
    max: Annotated[Duration, Field(gt=0)] = Field(
        default="1s",
        validate_default=True,
        description="Longest single wait between two tries, whatever the growth.",
    )
    multiplier: Annotated[float, Strict(), Field(ge=1, le=10)] = Field(
        default=2.0,
        description="Growth of the wait from one retry to the next (2 doubles it). Not used by decorrelated jitter.",
    )
    jitter: Literal["full", "equal", "decorrelated", "none"] = Field(
        default="full",
        description=(
            "Randomisation of each wait so that many clients do not retry in lock step: full (0 to the "
            "computed wait, Envoy's choice), equal (half fixed, half random), decorrelated (AWS), none."
        ),
    )

    @model_validator(mode="after")
    def _max_not_below_initial(self) -> BackoffOptions:
        keep_ordered(
            self,
            "initial",
            "max",
            f"max ({format_duration(self.max)}) cannot be shorter than initial ({format_duration(self.initial)})",
            "max",
        )
        return self


class Backoff:
    """Computes waits; one instance per route, sharing nothing per request but the RNG."""

    __slots__ = ("initial", "max", "multiplier", "jitter", "_random")

    def __init__(self, options: BackoffOptions, rng: random.Random | None = None) -> None:
        self.initial = options.initial
        self.max = options.max
        self.multiplier = options.multiplier
        self.jitter = options.jitter
        self._random = (rng or random.Random()).random

    def ceiling(self, retry: int) -> float:
        """The un-jittered wait before retry number ``retry`` (1 = the first retry)."""
        exponent = min(retry - 1, 64)
        return min(self.max, self.initial * self.multiplier**exponent)

    def delay(self, retry: int, previous: float) -> float:
        """Wait before retry ``retry``; ``previous`` is the wait before the one before (decorrelated)."""
        jitter = self.jitter
        if jitter == "decorrelated":
            low = self.initial
            high = max(low, previous * 3)
            return min(self.max, low + (high - low) * self._random())
        d = self.ceiling(retry)
        if jitter == "full":
            return d * self._random()
        if jitter == "equal":
            return d / 2 + d / 2 * self._random()
        return d
