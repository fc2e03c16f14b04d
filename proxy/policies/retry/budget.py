"""Retry budget: retries may add at most ``ratio`` of the request load, plus a small floor.

The model is Linkerd's (and Finagle's ``RetryBudget``): every request
deposits ``ratio`` of a token, every retry withdraws one, and a reserve of
``min_per_second * window`` tokens lets a quiet route retry at all. Deposits
and withdrawals older than ``window`` expire, so a burst of failures long ago
does not block retries now. When the budget is spent, failures go back to the
client at once instead of multiplying the load on an upstream that is down.

Over any one window: ``retries <= ratio * requests + min_per_second * window``.

``scope: route`` (the default) gives each route its own budget; ``scope: upstream`` one budget
per upstream, shared by every route using that upstream with that scope (as Envoy's is per
cluster), so many routes failing against one upstream cannot each add their own share of
retries. A shared budget is kept across reloads that leave its settings as they were.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, Strict

from proxy.clock import Clock
from proxy.options.base import PolicyModel
from proxy.options.units import Duration, Percent

SLOTS = 10  # the window is kept as this many slices, so memory is fixed


class BudgetOptions(PolicyModel):
    """Cap on the extra load retries may add (as in Linkerd and Envoy)."""

    ratio: Percent = Field(
        default="20%",
        validate_default=True,
        description=(
            "Retries allowed as a share of requests over the window: 20% means at most one retry per five "
            "requests (Linkerd's and Envoy's default)."
        ),
    )
    min_per_second: Annotated[float, Strict(), Field(ge=0)] = Field(
        default=5,
        description="Retries per second always allowed on top of the ratio, so a low-traffic route can still retry.",
    )
    window: Annotated[Duration, Field(gt=0)] = Field(
        default="10s",
        validate_default=True,
        description="How long requests and retries count against the budget (Linkerd's ttl, 10s).",
    )
    scope: Literal["route", "upstream"] = Field(
        default="route",
        description=(
            "route: this route's own budget. upstream: one budget for the upstream, shared by every route "
            "sending to it with scope upstream (Envoy's is per cluster); those routes must give it the same "
            "ratio, min_per_second and window."
        ),
    )


class RetryBudget:
    """Token accounting over a sliding window of ``SLOTS`` slices, on the injected clock."""

    __slots__ = (
        "ratio",
        "reserve",
        "_width",
        "_clock",
        "_requests",
        "_retries",
        "_epoch",
        "_slot",
        "_next_roll",
        "_req_sum",
        "_ret_sum",
    )

    def __init__(self, options: BudgetOptions, clock: Clock) -> None:
        self.ratio = options.ratio
        self.reserve = options.min_per_second * options.window
        self._width = options.window / SLOTS
        self._clock = clock
        self._requests = [0] * SLOTS
        self._retries = [0] * SLOTS
        self._epoch = int(clock.now() // self._width)
        self._slot = self._epoch % SLOTS
        # When the current slice ends: until then a request only adds to it (no division per request).
        self._next_roll = (self._epoch + 1) * self._width
        self._req_sum = 0
        self._ret_sum = 0

    def _roll(self, now: float | None = None) -> int:
        if now is None:
            now = self._clock.now()
        if now < self._next_roll:
            return self._slot
        epoch = int(now // self._width)
        if epoch != self._epoch:
            stale = min(epoch - self._epoch, SLOTS)
            for step in range(1, stale + 1):
                slot = (self._epoch + step) % SLOTS
                self._req_sum -= self._requests[slot]
                self._ret_sum -= self._retries[slot]
                self._requests[slot] = 0
                self._retries[slot] = 0
            self._epoch = epoch
        self._slot = epoch % SLOTS
        self._next_roll = (epoch + 1) * self._width
        return self._slot

    def request(self, now: float | None = None) -> None:
        """Count one request (first try) into the window (``now``: the clock's time, if the caller has it)."""
        slot = self._roll(now)
        self._requests[slot] += 1
        self._req_sum += 1

    def snapshot(self) -> dict[str, int]:
        """Requests and retries in the window, and how many retries it allows (status page)."""
        self._roll()
        allowed = int(self.ratio * self._req_sum + self.reserve)
        return {"requests": self._req_sum, "retries": self._ret_sum, "allowed": allowed}

    def try_spend(self) -> bool:
        """Take one retry from the budget; False when the budget is spent."""
        slot = self._roll()
        if self._ret_sum + 1 > self.ratio * self._req_sum + self.reserve:
            return False
        self._retries[slot] += 1
        self._ret_sum += 1
        return True
