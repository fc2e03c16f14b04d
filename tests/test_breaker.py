"""Circuit breaker: the state machine on a ManualClock, a property test, and real sockets."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from pydantic import ValidationError

from proxy.clock import ManualClock
from proxy.config import parse_policy
from proxy.kernel.exchange import Exchange, LocalReply
from proxy.metrics import Metrics
from proxy.policies.breaker.layer import BreakerLayer
from proxy.policies.breaker.machine import CLOSED, HALF_OPEN, OPEN, CircuitBreaker
from proxy.policies.breaker.options import BreakerOptions
from proxy.policies.breaker.window import CountWindow
from proxy.upstream.errors import ConnectFailure
from tests.conftest import policy_text
from tests.support.metrics import get_metrics, metric_value
from tests.support.raw_upstream import RawUpstream


def make(clock: ManualClock | None = None, metrics: Metrics | None = None, **options) -> CircuitBreaker:
    options.setdefault("consecutive_failures", 0)
    return CircuitBreaker("b", BreakerOptions(**options), clock or ManualClock(), metrics)


def call(breaker: CircuitBreaker, failed: bool, duration: float = 0.01) -> bool:
    """One call through the breaker: False when it was refused."""
    token = breaker.acquire()
    if token < 0:
        return False
    breaker.record(token, failed, duration)
    return True


# --------------------------------------------------------------------------- options


def test_window_accepts_calls_or_duration_and_refuses_nonsense():
    assert BreakerOptions(window=20).window.calls == 20
    assert BreakerOptions(window="30s").window.seconds == 30.0
    assert BreakerOptions(window="30s").model_dump(mode="json")["window"] == "30s"
    for bad in (0, "0.5s", "lots", True, 20_000):
        with pytest.raises(ValidationError):
            BreakerOptions(window=bad)
    with pytest.raises(ValidationError, match="max_open_for"):
        BreakerOptions(open_for="10s", max_open_for="5s")
    with pytest.raises(ValidationError, match="not a failure class"):
        BreakerOptions(failure_on=["5xx", "sometimes"])
    assert BreakerOptions(failure_on=[503, "timeout"]).failure_on == ("503", "timeout")


# --------------------------------------------------------------------------- closed -> open


def test_consecutive_failures_trip_and_a_success_resets_the_run():
    breaker = make(consecutive_failures=3, minimum_calls=100)
    for _ in range(2):
        call(breaker, True)
    call(breaker, False)  # the run starts again
    call(breaker, True)
    call(breaker, True)
    assert breaker.state == CLOSED
    call(breaker, True)
    assert breaker.state == OPEN


def test_failure_rate_needs_minimum_calls_then_trips_on_count_window():
    breaker = make(window=10, minimum_calls=4, failure_rate="50%")
    assert call(breaker, True) and call(breaker, True) and call(breaker, True)
    assert breaker.state == CLOSED  # 3 of 3 failed, but fewer than minimum_calls
    call(breaker, False)  # 3 of 4 = 75% >= 50%
    assert breaker.state == OPEN


def test_count_window_smaller_than_minimum_calls_judges_once_full():
    breaker = make(window=3, minimum_calls=10, failure_rate="50%")
    call(breaker, True)
    call(breaker, True)
    assert breaker.state == CLOSED
    call(breaker, False)  # window full: 2 of 3 failed
    assert breaker.state == OPEN


def test_count_window_forgets_calls_older_than_the_last_n():
    breaker = make(window=4, minimum_calls=4, failure_rate="50%")
    call(breaker, True)
    for _ in range(5):
        call(breaker, False)
    # Window now holds the last four (all successes): one more failure is 1 of 4 = 25%.
    call(breaker, True)
    assert breaker.state == CLOSED
    assert (breaker.window.calls, breaker.window.failures) == (4, 1)


@settings(max_examples=60, deadline=None)
@given(
    size=st.integers(min_value=1, max_value=8),
    outcomes=st.lists(st.tuples(st.booleans(), st.booleans()), max_size=60),
)
def test_count_window_totals_equal_the_last_n_outcomes(size, outcomes):
    # Against the plain model: the totals are those of the last `size` (failed, slow) pairs.
    window = CountWindow(size)
    for index, (failed, slow) in enumerate(outcomes):
        window.add(0.0, failed, slow)
        last = outcomes[max(0, index + 1 - size) : index + 1]
        assert (window.calls, window.failures, window.slow) == (
            len(last),
            sum(f for f, _ in last),
            sum(s for _, s in last),
        )


def test_time_window_forgets_calls_older_than_its_duration():
    clock = ManualClock()
    breaker = make(clock, window="10s", minimum_calls=4, failure_rate="50%")
    for _ in range(3):
        call(breaker, True)
    clock.advance(11)  # those failures leave the window
    call(breaker, True)
    for _ in range(3):
        call(breaker, False)
    assert breaker.state == CLOSED  # 1 of 4 in the window
    assert (breaker.window.calls, breaker.window.failures) == (4, 1)
    call(breaker, True)
    call(breaker, True)  # 3 of 6 = 50%
    assert breaker.state == OPEN


def test_slow_calls_trip_on_their_own_rate():
    breaker = make(
        window=10, minimum_calls=4, failure_rate="100%", slow_call_duration="1s", slow_call_rate="75%"
    )
    for duration in (2.0, 0.1, 1.5):
        call(breaker, False, duration)
    assert breaker.state == CLOSED
    call(breaker, False, 1.0)  # exactly the threshold counts as slow: 3 of 4
    assert breaker.state == OPEN


# --------------------------------------------------------------------------- open / half-open


def tripped(clock: ManualClock, **options) -> CircuitBreaker:
    options.setdefault("window", 4)
    options.setdefault("minimum_calls", 2)
    options.setdefault("open_for", "10s")
    options.setdefault("max_open_for", "35s")
    options.setdefault("half_open_calls", 2)
    breaker = make(clock, **options)
    call(breaker, True)
    call(breaker, True)
    assert breaker.state == OPEN
    return breaker


def test_open_refuses_until_open_for_passes_then_half_open():
    clock = ManualClock()
    breaker = tripped(clock)
    assert breaker.acquire() == -1
    assert breaker.retry_after() == pytest.approx(10)
    clock.advance(9.9)
    assert breaker.acquire() == -1
    assert breaker.retry_after() == pytest.approx(0.1)
    clock.advance(0.1)
    assert breaker.acquire() >= 0
    assert breaker.state == HALF_OPEN


def test_half_open_admits_only_its_permits_and_closes_when_trials_succeed():
    clock = ManualClock()
    breaker = tripped(clock)
    clock.advance(10)
    first, second = breaker.acquire(), breaker.acquire()
    assert first >= 0 and second >= 0
    assert breaker.acquire() == -1  # third concurrent call fails fast
    breaker.record(first, False, 0.01)
    assert breaker.state == HALF_OPEN and breaker.acquire() == -1  # permits are per trial, not refilled
    breaker.record(second, False, 0.01)
    assert breaker.state == CLOSED
    assert breaker.window.calls == 0  # a fresh window after closing


def test_failed_trials_reopen_with_doubling_open_for_capped_then_reset_on_close():
    clock = ManualClock()
    breaker = tripped(clock)  # open_for 10s, max 35s
    seen = []
    for _ in range(3):
        clock.advance(breaker.retry_after())
        a, b = breaker.acquire(), breaker.acquire()
        breaker.record(a, True, 0.01)
        breaker.record(b, False, 0.01)  # 1 of 2 failed = 50%: reopen
        assert breaker.state == OPEN
        seen.append(breaker.retry_after())
    assert seen == [pytest.approx(20), pytest.approx(35), pytest.approx(35)]
    clock.advance(35)
    for token in (breaker.acquire(), breaker.acquire()):
        breaker.record(token, False, 0.01)
    assert breaker.state == CLOSED and breaker.open_for == 10
    call(breaker, True)
    call(breaker, True)
    assert breaker.retry_after() == pytest.approx(10)


def test_half_open_closes_when_its_trial_failure_rate_is_below_the_thresholds():
    clock = ManualClock()
    breaker = tripped(clock, half_open_calls=3, slow_call_duration="1s", slow_call_rate="50%")
    clock.advance(10)
    trials = [breaker.acquire() for _ in range(3)]
    breaker.record(trials[0], True, 0.01)  # 1 of 3 failed (33% < 50%)
    breaker.record(trials[1], False, 2.0)  # 1 of 3 slow (33% < 50%)
    breaker.record(trials[2], False, 0.01)
    assert breaker.state == CLOSED and breaker.open_for == 10
    # The same trials with two failures of three (67% >= 50%) reopen it.
    call(breaker, True)
    call(breaker, True)
    clock.advance(10)
    trials = [breaker.acquire() for _ in range(3)]
    for token, failed in zip(trials, (True, True, False), strict=True):
        breaker.record(token, failed, 0.01)
    assert breaker.state == OPEN


def test_released_permit_is_given_back_and_stale_outcomes_are_ignored():
    clock = ManualClock()
    breaker = tripped(clock)
    clock.advance(10)
    a = breaker.acquire()
    b = breaker.acquire()
    breaker.release(a)  # cancelled: no outcome, the permit returns
    assert breaker.in_flight == 1 and breaker.permits == 1
    c = breaker.acquire()
    breaker.record(b, False, 0.01)
    breaker.record(c, False, 0.01)
    assert breaker.state == CLOSED
    breaker.record(a, True, 0.01)  # an outcome from before the transition changes nothing
    assert breaker.state == CLOSED and breaker.window.calls == 0


def test_transitions_are_counted_and_gauged():
    metrics = Metrics()
    clock = ManualClock()
    breaker = make(clock, metrics, window=4, minimum_calls=2, half_open_calls=1)
    call(breaker, True)
    call(breaker, True)
    clock.advance(10)
    call(breaker, False)
    value = metrics.registry.get_sample_value
    assert value("fender_breaker_state", {"breaker": "b"}) == CLOSED
    for came, to in (("closed", "open"), ("open", "half_open"), ("half_open", "closed")):
        assert (
            value("fender_breaker_transitions_total", {"breaker": "b", "from_state": came, "to_state": to})
            == 1
        )
    assert value("fender_breaker_calls_total", {"breaker": "b", "outcome": "failure"}) == 2


# --------------------------------------------------------------------------- property test


class BreakerMachine(RuleBasedStateMachine):
    """Random calls, completions, cancellations and time steps against the invariants."""

    def __init__(self) -> None:
        super().__init__()
        self.clock = ManualClock()
        self.breaker = CircuitBreaker(
            "p",
            BreakerOptions(
                window=5,
                minimum_calls=3,
                consecutive_failures=4,
                open_for="1s",
                max_open_for="8s",
                half_open_calls=3,
            ),
            self.clock,
        )
        self.pending: list[int] = []

    @rule()
    def start_call(self):
        state_before = self.breaker.state
        open_before = state_before == OPEN and self.clock.now() < self.breaker.open_until
        full_before = state_before == HALF_OPEN and self.breaker.permits == 0
        token = self.breaker.acquire()
        if open_before or full_before:
            assert token == -1, "an upstream call was admitted while open"
        if token >= 0:
            self.pending.append(token)

    @precondition(lambda self: self.pending)
    @rule(index=st.integers(0, 100), failed=st.booleans(), duration=st.floats(0, 3))
    def finish_call(self, index, failed, duration):
        token = self.pending.pop(index % len(self.pending))
        self.breaker.record(token, failed, duration)

    @precondition(lambda self: self.pending)
    @rule(index=st.integers(0, 100))
    def cancel_call(self, index):
        self.breaker.release(self.pending.pop(index % len(self.pending)))

    @rule(seconds=st.sampled_from([0.1, 0.5, 1.0, 3.0, 9.0]))
    def advance(self, seconds):
        self.clock.advance(seconds)

    @invariant()
    def half_open_within_permits(self):
        b = self.breaker
        if b.state == HALF_OPEN:
            assert 0 <= b.in_flight <= 3
            assert b.in_flight + b.trial_calls + b.permits == 3
        assert 1 <= b.open_for <= 8
        assert b.window.calls <= 5


TestBreakerProperties = BreakerMachine.TestCase
TestBreakerProperties.settings = settings(max_examples=150, stateful_step_count=60, deadline=None)


# --------------------------------------------------------------------------- layer


async def test_layer_releases_the_permit_when_the_request_is_cancelled():
    clock = ManualClock()
    breaker = tripped(clock, half_open_calls=1)
    clock.advance(10)
    entered = asyncio.Event()

    async def hangs(ex):
        entered.set()
        await asyncio.Event().wait()

    layer = BreakerLayer(breaker, hangs, clock)
    task = asyncio.ensure_future(layer(_exchange()))
    await asyncio.wait_for(entered.wait(), 5)
    assert breaker.permits == 0
    refused = await layer(_exchange())
    assert refused.status == 503 and refused.reason == "breaker_open"
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert breaker.permits == 1 and breaker.in_flight == 0


async def test_layer_counts_upstream_faults_but_not_fenders_own_answers():
    clock = ManualClock()
    breaker = make(clock, consecutive_failures=2, minimum_calls=100)
    answers = [LocalReply("bulkhead_full", status=503)] * 3 + [
        LocalReply.from_upstream_error(ConnectFailure())
    ] * 2

    async def next_answer(ex):
        return answers.pop(0)

    layer = BreakerLayer(breaker, next_answer, clock)
    for _ in range(3):
        await layer(_exchange())
    assert breaker.state == CLOSED and breaker.window.calls == 0
    await layer(_exchange())
    await layer(_exchange())
    assert breaker.state == OPEN


def _exchange() -> Exchange:
    return Exchange("GET", b"/", [], b"h", b"", None, None, b"rid", "r", 0.0)


# --------------------------------------------------------------------------- real sockets


BREAKER_ROUTES = """
- name: api
  upstream: echo
  match: {path_prefix: /api}
  circuit_breaker: {consecutive_failures: 3, open_for: 10s, half_open_calls: 2}
- name: other
  upstream: echo
  circuit_breaker: {consecutive_failures: 3, open_for: 10s, half_open_calls: 2}
"""


async def test_dead_upstream_trips_the_breaker_until_open_for_passes_then_recovery_closes_it(start_fender):
    healthy = False

    async def handler(req, conn):
        await conn.send(200 if healthy else 500, [], b"x")

    clock = ManualClock()
    async with RawUpstream(handler) as up:
        fender = await start_fender(policy_text(up.port, routes=BREAKER_ROUTES), clock=clock)
        async with httpx.AsyncClient() as client:
            for _ in range(3):
                assert (await client.get(fender.url + "/api/x")).status_code == 500
            assert len(up.requests) == 3
            # Open: both routes share the upstream's breaker; the upstream sees nothing more.
            for path in ("/api/x", "/other", "/api/y") * 4:
                r = await client.get(fender.url + path)
                assert r.status_code == 503
                assert r.headers["x-fender-error"] == "breaker_open"
                assert r.headers["retry-after"] == "10"
            assert len(up.requests) == 3
            clock.advance(6)
            r = await client.get(fender.url + "/api/x")
            assert r.status_code == 503 and r.headers["retry-after"] == "4"
            assert len(up.requests) == 3
            clock.advance(4)
            healthy = True
            for _ in range(2):  # the two trial calls
                assert (await client.get(fender.url + "/other")).status_code == 200
            assert len(up.requests) == 5
            for _ in range(5):
                assert (await client.get(fender.url + "/api/x")).status_code == 200
            assert len(up.requests) == 10
            admin = (await client.get(fender.admin_url + "/admin/breakers")).json()
        metrics = await get_metrics(fender)
    [state] = admin["breakers"]
    assert state["name"] == "echo" and state["state"] == "closed" and state["trips"] == 1
    assert metric_value(metrics, "fender_breaker_state", breaker="echo") == 0
    assert metric_value(metrics, "fender_breaker_rejected_total", breaker="echo") == 13
    assert metric_value(metrics, "fender_breaker_transitions_total", breaker="echo", to_state="open") == 1
    assert metric_value(metrics, "fender_local_responses_total", route="api", reason="breaker_open") == 9


async def test_fallback_route_scope_and_admin_force(start_fender):
    async with RawUpstream(lambda req, conn: conn.send(503, [], b"down")) as up:
        routes = """
        - name: catalog
          upstream: echo
          circuit_breaker:
            consecutive_failures: 1
            scope: route
            fallback: {status: 200, body: "catalog unavailable", content_type: text/plain}
        """
        fender = await start_fender(policy_text(up.port, routes=routes))
        async with httpx.AsyncClient() as client:
            assert (await client.get(fender.url + "/")).status_code == 503
            r = await client.get(fender.url + "/")
            assert (r.status_code, r.text, r.headers["content-type"]) == (
                200,
                "catalog unavailable",
                "text/plain",
            )
            assert r.headers["x-fender-error"] == "breaker_open"
            closed = await client.post(fender.admin_url + "/admin/breakers/catalog/close")
            assert closed.json()["state"] == "closed"
            assert (await client.get(fender.url + "/")).status_code == 503  # reached the upstream again
            assert len(up.requests) == 2
            opened = await client.post(fender.admin_url + "/admin/breakers/catalog/open")
            assert opened.json()["state"] == "open"
            missing = await client.post(fender.admin_url + "/admin/breakers/nope/open")
            assert missing.status_code == 404


def test_routes_with_different_settings_get_different_breakers():
    text = policy_text(
        1,
        routes="""
        - {name: a, upstream: echo, match: {path_prefix: /a}, circuit_breaker: {open_for: 10s}}
        - {name: b, upstream: echo, match: {path_prefix: /b}, circuit_breaker: {open_for: 10s}}
        - {name: c, upstream: echo, circuit_breaker: {open_for: 20s}}
        """,
    )
    from proxy.dataplane.runtime import Runtime

    runtime = Runtime(parse_policy(text, "t.yaml"), Metrics())
    # The outermost handler is the breaker layer's bound __call__ (pipeline.py binds layer objects).
    layers = {r.name: r.pipeline.__self__ for r in runtime.routes}
    assert layers["a"].breaker is layers["b"].breaker
    assert layers["c"].breaker is not layers["a"].breaker
    assert {layers["a"].breaker.name, layers["c"].breaker.name} == {"echo", "echo.c"}
