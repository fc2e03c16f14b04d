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
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import Field, PlainSerializer, PlainValidator, WithJsonSchema, model_validator

from proxy.clock import Clock
from proxy.config.base import Count, PolicyModel, Text, keep_ordered
from proxy.config.units import (
    DURATION_PATTERN,
    Duration,
    Percent,
    describe_value,
    format_duration,
    parse_duration,
    policy_error,
)
from proxy.dataplane.exchange import Exchange, LocalReply, Reply
from proxy.metrics import FastCounter
from proxy.resilience.outcome import GRPC_CONDITIONS, grpc_code, grpc_codes

log = logging.getLogger("fender.breaker")

CLOSED, OPEN, HALF_OPEN = 0, 1, 2
STATE_NAMES = ("closed", "open", "half_open")

# Fault reasons of the forwarder (LocalReply.reason) a breaker can count.
FAULT_CLASSES = (
    "timeout",
    "connect_failure",
    "connect_timeout",
    "reset",
    "stream_reset",
    "bad_response",
    "pool_overflow",
    "no_healthy_replica",
)
MAX_WINDOW_CALLS = 10_000
TIME_SLOTS = 10


# --------------------------------------------------------------------------- options


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
    if value in ("5xx", "4xx") or value in FAULT_CLASSES or value in GRPC_CONDITIONS:
        return value
    if value.isdigit() and 400 <= int(value) <= 599:
        return value
    raise policy_error(
        f"{describe_value(value)} is not a failure class (use 5xx, 4xx, a status from 400 to 599, "
        f"one of {', '.join(FAULT_CLASSES)}, or a gRPC status like unavailable)"
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
        description="Open when this share of the calls in the window failed (once minimum_calls are in it).",
    )
    slow_call_duration: Annotated[Duration | None, Field(gt=0)] = Field(
        default=None,
        description="Calls whose response head took longer than this count as slow. Unset: no slow-call rule.",
    )
    slow_call_rate: Percent = Field(
        default="100%",
        description="Open when this share of the calls in the window were slow (needs slow_call_duration).",
    )
    window: Window = Field(
        default=20,
        description="The calls the rates are computed over: a number (the last N calls) or a duration like 30s (time based).",
    )
    minimum_calls: Count = Field(
        default=10,
        ge=1,
        description="Calls needed in the window before the rates are judged, so two failures out of two do not trip it (a smaller count window judges once full).",
    )
    open_for: Annotated[Duration, Field(gt=0)] = Field(
        default="10s",
        description="How long the breaker stays open before letting trial calls through. Doubles on each re-trip.",
    )
    max_open_for: Annotated[Duration, Field(gt=0)] = Field(
        default="5m", description="Ceiling of open_for's growth."
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
            + ", ".join(FAULT_CLASSES)
            + "; or a gRPC status of a trailers-only answer (unavailable, internal, deadline_exceeded...). "
            "Other upstream answers count as successes; Fender's own answers (rate limit, bulkhead) are not counted."
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


# --------------------------------------------------------------------------- windows


class CountWindow:
    """The outcomes of the last N calls in a ring, with running totals."""

    __slots__ = ("_ring", "_next", "size", "calls", "failures", "slow")

    def __init__(self, size: int) -> None:
        self._ring = bytearray(size)  # bit 0 failure, bit 1 slow, bit 2 occupied
        self._next = 0
        self.size = size
        self.calls = self.failures = self.slow = 0

    def add(self, now: float, failed: bool, slow: bool) -> None:
        # Written for the usual case (a success replacing a success: two stores); bools never
        # meet integer arithmetic, which CPython takes a slow path for.
        ring = self._ring
        index = self._next
        old = ring[index]
        if old == 0:
            self.calls += 1  # the ring is still filling; once full, one call leaves as one enters
        elif old != 4:
            if old & 1:
                self.failures -= 1
            if old & 2:
                self.slow -= 1
        if failed or slow:
            ring[index] = 4 | (1 if failed else 0) | (2 if slow else 0)
            if failed:
                self.failures += 1
            if slow:
                self.slow += 1
        else:
            ring[index] = 4
        index += 1
        self._next = index if index < self.size else 0

    def expire(self, now: float) -> None:
        pass

    def reset(self) -> None:
        self._ring = bytearray(self.size)
        self._next = 0
        self.calls = self.failures = self.slow = 0


class TimeWindow:
    """The outcomes of the last T seconds, in TIME_SLOTS slices (fixed memory)."""

    __slots__ = ("_width", "_slots", "_epoch", "calls", "failures", "slow")

    def __init__(self, seconds: float, now: float) -> None:
        self._width = seconds / TIME_SLOTS
        self._slots = [[0, 0, 0] for _ in range(TIME_SLOTS)]
        self._epoch = int(now // self._width)
        self.calls = self.failures = self.slow = 0

    def expire(self, now: float) -> None:
        epoch = int(now // self._width)
        if epoch == self._epoch:
            return
        for step in range(1, min(epoch - self._epoch, TIME_SLOTS) + 1):
            slot = self._slots[(self._epoch + step) % TIME_SLOTS]
            self.calls -= slot[0]
            self.failures -= slot[1]
            self.slow -= slot[2]
            slot[0] = slot[1] = slot[2] = 0
        self._epoch = epoch

    def add(self, now: float, failed: bool, slow: bool) -> None:
        self.expire(now)
        slot = self._slots[self._epoch % TIME_SLOTS]
        slot[0] += 1
        slot[1] += failed
        slot[2] += slow
        self.calls += 1
        self.failures += failed
        self.slow += slow

    def reset(self) -> None:
        for slot in self._slots:
            slot[0] = slot[1] = slot[2] = 0
        self.calls = self.failures = self.slow = 0


# --------------------------------------------------------------------------- state machine


class CircuitBreaker:
    """The breaker's state; shared by every route in its scope. Works on the injected clock."""

    def __init__(self, name: str, options: BreakerOptions, clock: Clock, metrics=None) -> None:
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

    def _bind_metrics(self, metrics) -> None:
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
        if self._state_gauge is not None:
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

    def checkpoint_snapshot(self) -> dict:
        """Open/half-open state for a checkpoint; the time left open as a wall-clock instant."""
        now = self.clock.now()
        return {
            "settings": self.options.model_dump(mode="json"),
            "state": STATE_NAMES[self.state],
            "open_until": time.time() + (self.open_until - now) if self.state == OPEN else None,
            "open_for": self.open_for,
            "trips": self.trips,
        }

    def checkpoint_restore(self, data: dict) -> None:
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

    def snapshot(self) -> dict:
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


# --------------------------------------------------------------------------- pipeline layer


def _classifier(options: BreakerOptions):
    statuses: set[int] = set()
    reasons: set[str] = set()
    for item in options.failure_on:
        if item == "5xx":
            statuses.update(range(500, 600))
        elif item == "4xx":
            statuses.update(range(400, 500))
        elif item.isdigit():
            statuses.add(int(item))
        elif item not in GRPC_CONDITIONS:
            reasons.add(item)
    return frozenset(statuses), frozenset(reasons), grpc_codes(options.failure_on)


_UPSTREAM_FAULTS = frozenset(FAULT_CLASSES)


class BreakerLayer:
    __slots__ = ("breaker", "next", "clock", "_statuses", "_reasons", "_grpc", "_fallback", "_note")

    def __init__(self, breaker: CircuitBreaker, next_handler, clock: Clock) -> None:
        self.breaker = breaker
        self.next = next_handler
        self.clock = clock
        self._statuses, self._reasons, self._grpc = _classifier(breaker.options)
        fallback = breaker.options.fallback
        self._fallback = None
        if fallback is not None:
            self._fallback = (fallback.status, fallback.body.encode(), fallback.content_type.encode())
        self._note = f"breaker {breaker.name} "

    def _open_reply(self) -> Reply:
        wait = max(1, math.ceil(self.breaker.retry_after()))
        extra = [(b"retry-after", str(wait).encode())]
        if self._fallback is None:
            return LocalReply(
                "breaker_open", f"circuit {self.breaker.name} is open", status=503, headers=extra
            )
        status, body, content_type = self._fallback
        reply = LocalReply("breaker_open", status=status, headers=extra)
        reply.body = body
        reply.headers[0] = (b"content-type", content_type)
        reply.headers[1] = (b"content-length", str(len(body)).encode())
        return reply

    async def __call__(self, ex: Exchange) -> Reply:
        breaker = self.breaker
        token = breaker.epoch if breaker.state == CLOSED else breaker.acquire()
        if token < 0:
            if ex.trace is not None:
                ex.note(self._note + STATE_NAMES[breaker.state] + " rejected")
            return self._open_reply()
        if ex.trace is not None:
            ex.note(self._note + STATE_NAMES[breaker.state])
        started = self.clock.now()
        try:
            reply = await self.next(ex)
        except BaseException:
            breaker.release(token)
            raise
        if isinstance(reply, LocalReply):
            reason = reply.reason
            if reason in self._reasons:
                breaker.record(token, True, self.clock.now() - started)
            elif reason in _UPSTREAM_FAULTS:
                breaker.record(token, False, self.clock.now() - started)
            else:
                breaker.release(
                    token
                )  # Fender's own answer (bulkhead, limits): says nothing about the upstream
        else:
            now = self.clock.now()
            failed = reply.status in self._statuses
            if self._grpc and not failed:
                failed = grpc_code(reply) in self._grpc  # a trailers-only gRPC answer (outcome.py)
            breaker.record(token, failed, now - started, now)
        return reply


def build_layer(route, next_handler, ctx) -> BreakerLayer | None:
    options: BreakerOptions | None = getattr(route, "circuit_breaker", None)
    if options is None:
        return None
    registry: dict = ctx.shared.setdefault("breaker", {})
    if options.scope == "route":
        key: tuple = ("route", route.name, options)
        name = route.name
    else:
        key = ("upstream", route.upstream, options)
        name = route.upstream
    breaker = registry.get(key)
    if breaker is None:
        taken = {b.name for b in registry.values()}
        if name in taken:
            name = f"{route.upstream}.{route.name}"
        breaker = registry[key] = CircuitBreaker(name, options, ctx.clock, ctx.metrics)
    _register_checkpoint(ctx, breaker)
    return BreakerLayer(breaker, next_handler, ctx.clock)


def _register_checkpoint(ctx, breaker: CircuitBreaker) -> None:
    """Save this breaker in checkpoints under its name (upstream or route); settings are in the data."""
    from proxy.dataplane.runtime import register_checkpoint  # late: the runtime imports the pipeline

    try:
        register_checkpoint(
            ctx, f"breaker/{breaker.name}", breaker.checkpoint_snapshot, breaker.checkpoint_restore
        )
    except ValueError:
        # Two breakers with one name can only coexist after a reload (a kept breaker and a new one
        # for the same upstream); the first keeps the checkpoint slot, a restart names them apart.
        log.debug("breaker %s: name taken in this checkpoint, not saved", breaker.name)


def breakers(runtime) -> list[CircuitBreaker]:
    """Every breaker of a runtime, in creation order (for the admin API)."""
    return list(runtime.shared.get("breaker", {}).values())
