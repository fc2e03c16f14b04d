"""Circuit breaker: stop calling an upstream that keeps failing, probe it, close again.

States and transitions follow Resilience4j's CircuitBreaker:

* **closed**: calls pass; each outcome goes into a sliding window (the last
  N calls, or the calls of the last T seconds). Once ``minimum_calls`` are in
  the window, a failure rate or slow-call rate at or above its threshold
  opens the breaker. ``consecutive_failures`` failures in a row also open it
  (Envoy's outlier-detection rule; it needs no minimum).
* **open**: every call is answered at once (503 ``breaker_open`` with
  Retry-After, or the configured fallback). After ``open_for`` the next call
  moves the breaker to half-open. Each re-trip from half-open doubles
  ``open_for`` up to ``max_open_for``; closing resets it.
* **half-open**: only ``half_open_calls`` trial calls are let through (the
  rest fail fast as if open). When all of them have completed, the rates over
  those trials decide: below the thresholds closes, otherwise it opens again.

A call's outcome is judged when its response head arrives (status, or the
fault that replaced it), like Envoy's outlier detection. Its half-open permit
is released then, or when the request is cancelled, whichever comes first.

One breaker guards one upstream by default: routes to the same upstream with
the same settings share it (``scope: route`` gives a route its own).
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

from proxy.clock import Clock
from proxy.metrics import FastCounter, Metrics
from proxy.options.units import (
    format_duration,
)
from proxy.policies.breaker.options import BreakerOptions
from proxy.policies.breaker.window import CountWindow, TimeWindow

log = logging.getLogger("fender.breaker")

CLOSED, OPEN, HALF_OPEN = 0, 1, 2
STATE_NAMES = ("closed", "open", "half_open")


class CircuitBreaker:
    """The breaker's state; shared by every route in its scope. Works on the injected clock."""

    def __init__(
        self, name: str, options: BreakerOptions, clock: Clock, metrics: Metrics | None = None
    ) -> None:
        self.name = name
        self.options = options
        self.clock = clock
        self.state = CLOSED
        # Bumped on every transition: outcomes of calls admitted in an earlier state are ignored.
        self.epoch = 0
        self.open_until = 0.0
        self.open_for = options.open_for
        self.trips = 0
        self.consecutive = 0
        # As in Resilience4j, a count window smaller than minimum_calls judges once it is full.
        self._minimum = options.minimum_calls
        if options.window.calls is not None:
            self.window: CountWindow | TimeWindow = CountWindow(options.window.calls)
            self._minimum = min(self._minimum, options.window.calls)
        else:
            self.window = TimeWindow(options.window.seconds or 1.0, clock.now())
        # Half-open bookkeeping.
        self.permits = 0  # trial permits still available
        self.in_flight = 0  # trial calls admitted and not yet finished
        self.trial_calls = self.trial_failures = self.trial_slow = 0
        self._failure_rate = options.failure_rate
        self._slow_after = options.slow_call_duration
        # The same threshold as a number (no slow-call rule: never slow), for one compare per call.
        self._slow_at = options.slow_call_duration if options.slow_call_duration is not None else math.inf
        self._slow_rate = options.slow_call_rate
        self._bind_metrics(metrics)

    def _bind_metrics(self, metrics: Metrics | None) -> None:
        self._metrics = metrics
        if metrics is None:
            self._state_gauge = None
            return
        name = self.name
        self._state_gauge = metrics.breaker_state.labels(name)
        self._state_gauge.set(CLOSED)
        self._rejected = metrics.breaker_rejected.labels(name)
        self._calls = [
            FastCounter(metrics.breaker_calls.labels(name, outcome))
            for outcome in ("success", "failure", "slow", "slow_failure")
        ]
        self._transitions: dict[tuple[int, int], Any] = {}

    # -- admission -----------------------------------------------------------

    def acquire(self) -> int:
        """An admission token (the current epoch) for a call, or -1 when the call must fail fast."""
        state = self.state
        if state == CLOSED:
            return self.epoch
        if state == OPEN:
            if self.clock.now() < self.open_until:
                self._reject()
                return -1
            self._transition(HALF_OPEN)
        if self.permits <= 0:
            self._reject()
            return -1
        self.permits -= 1
        self.in_flight += 1
        return self.epoch

    def _reject(self) -> None:
        if self._state_gauge is not None:
            self._rejected.inc()

    def retry_after(self) -> float:
        """Seconds until the breaker lets trial calls through (0 when half-open)."""
        return max(0.0, self.open_until - self.clock.now()) if self.state == OPEN else 0.0

    def release(self, token: int) -> None:
        """The admitted call ended without an outcome (cancelled, or an answer that is not counted)."""
        if token == self.epoch and self.state == HALF_OPEN:
            self.in_flight -= 1
            self.permits += 1

    def record(self, token: int, failed: bool, duration: float, now: float | None = None) -> None:
        """Outcome of an admitted call (``now``: the clock's time at its end, if the caller has it)."""
        slow = duration >= self._slow_at
        if self._state_gauge is not None:
            self._calls[(1 if failed else 0) + (2 if slow else 0)].inc()
        if token != self.epoch:
            return  # admitted before the last transition: the decision was already made
        state = self.state
        if state == CLOSED:
            if now is None:
                now = self.clock.now()
            window = self.window
            window.add(now, failed, slow)
            self.consecutive = self.consecutive + 1 if failed else 0
            limit = self.options.consecutive_failures
            if limit and self.consecutive >= limit:
                self._trip()
            elif (
                (window.failures or window.slow)  # else _over is False: skip the call (the usual case)
                and window.calls >= self._minimum
                and self._over(window.calls, window.failures, window.slow)
            ):
                self._trip()
        elif state == HALF_OPEN:
            self.in_flight -= 1
            self.trial_calls += 1
            self.trial_failures += failed
            self.trial_slow += slow
            if self.trial_calls >= self.options.half_open_calls:
                if self._over(self.trial_calls, self.trial_failures, self.trial_slow):
                    self.open_for = min(self.open_for * 2, self.options.max_open_for)
                    self._trip()
                else:
                    self.open_for = self.options.open_for
                    self._transition(CLOSED)

    def _over(self, calls: int, failures: int, slow: int) -> bool:
        if failures and failures >= self._failure_rate * calls:
            return True
        return self._slow_after is not None and slow > 0 and slow >= self._slow_rate * calls

    def _trip(self, cause: str | None = None) -> None:
        self.open_until = self.clock.now() + self.open_for
        self.trips += 1
        self._transition(OPEN, cause)

    # -- transitions ---------------------------------------------------------

    def _transition(self, to: int, cause: str | None = None) -> None:
        """Move to state ``to``; ``cause`` names a move no traffic made (an operator, a checkpoint)."""
        came = self.state
        self.state = to
        self.epoch += 1
        if to == CLOSED:
            self.window.reset()
            self.consecutive = 0
        elif to == HALF_OPEN:
            self.permits = self.options.half_open_calls
            self.in_flight = 0
            self.trial_calls = self.trial_failures = self.trial_slow = 0
        if self._state_gauge is not None and self._metrics is not None:
            self._state_gauge.set(to)
            key = (came, to)
            child = self._transitions.get(key)
            if child is None:
                child = self._transitions[key] = self._metrics.breaker_transitions.labels(
                    self.name, STATE_NAMES[came], STATE_NAMES[to]
                )
            child.inc()
        # A move traffic made and one an operator made must not read alike in the log.
        because = "" if cause is None else f" ({cause})"
        if to == OPEN:
            log.warning(
                "breaker %s: %s -> open for %s%s",
                self.name,
                STATE_NAMES[came],
                format_duration(round(self.open_for, 3)),
                because,
            )
        else:
            log.info("breaker %s: %s -> %s%s", self.name, STATE_NAMES[came], STATE_NAMES[to], because)

    # -- operator controls (admin API) --------------------------------------

    def force(self, state: str, by: str = "admin API") -> None:
        """Force open (for open_for) or closed (which restores open_for); ``by`` names who, for the log."""
        if state == "open":
            self._trip(f"forced open by {by}")
        elif state == "closed":
            self._close(f"forced closed by {by}")

    def reset(self, by: str = "admin API") -> None:
        """Operator reset: closed, empty window, open_for back to its setting, trip count zero."""
        self._close(f"reset by {by}")
        self.trips = 0

    def _close(self, cause: str) -> None:
        self.open_for = self.options.open_for
        if self.state != CLOSED:
            self._transition(CLOSED, cause)
        else:
            self.window.reset()
            self.consecutive = 0
            log.info("breaker %s: closed, window cleared (%s)", self.name, cause)

    # -- checkpoint (proxy.ops.checkpoint) -------------------------------------

    def checkpoint_snapshot(self) -> dict[str, Any]:
        """Open/half-open state for a checkpoint; the time left open as a wall-clock instant."""
        now = self.clock.now()
        return {
            "settings": self.options.model_dump(mode="json"),
            "state": STATE_NAMES[self.state],
            "open_until": time.time() + (self.open_until - now) if self.state == OPEN else None,
            "open_for": self.open_for,
            "trips": self.trips,
        }

    def checkpoint_restore(self, data: dict[str, Any]) -> None:
        """Re-open a breaker that was open (or half-open) in the previous process.

        Only when its settings are the same; an open breaker gets the time it had left (converted
        back to the injected clock), a half-open one is opened with no time left, so the next call
        is a trial call again. A closed breaker starts with an empty window.
        """
        if data.get("settings") != self.options.model_dump(mode="json"):
            return
        state = data.get("state")
        if state not in ("open", "half_open"):
            return
        left = float(data["open_until"]) - time.time() if state == "open" else 0.0
        self.open_for = min(max(float(data["open_for"]), self.options.open_for), self.options.max_open_for)
        self.trips = int(data.get("trips", 0))
        # Never longer than the breaker could have been open: a bad clock must not lock it out.
        self.open_until = self.clock.now() + min(max(left, 0.0), self.open_for)
        self._transition(OPEN, "restored from checkpoint")

    def snapshot(self) -> dict[str, Any]:
        self.window.expire(self.clock.now())
        window = self.window
        return {
            "name": self.name,
            "state": STATE_NAMES[self.state],
            "retry_after_seconds": round(self.retry_after(), 3),
            "open_for_seconds": self.open_for,
            "trips": self.trips,
            "consecutive_failures": self.consecutive,
            "window": {
                "kind": "calls" if self.options.window.calls is not None else "time",
                "size": str(self.options.window),
                "calls": window.calls,
                "failures": window.failures,
                "slow": window.slow,
            },
            "half_open": {"permits": self.permits, "in_flight": self.in_flight}
            if self.state == HALF_OPEN
            else None,
        }
