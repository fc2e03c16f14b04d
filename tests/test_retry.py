"""Retries: backoff bounds, the deadline, the retry budget, and real sockets end to end."""

from __future__ import annotations

import asyncio
import hashlib
import random

import httpx
import pytest
from pydantic import ValidationError

from proxy.clock import ManualClock
from proxy.kernel.exchange import Exchange, LocalReply
from proxy.kernel.reasons import retry_after_of
from proxy.metrics import Metrics
from proxy.policies.retry.backoff import Backoff, BackoffOptions
from proxy.policies.retry.budget import BudgetOptions, RetryBudget
from proxy.policies.retry.layer import RetryLayer, RetryMetrics
from proxy.policies.retry.options import RetryOptions
from proxy.upstream.errors import ResetBeforeHeaders
from tests.conftest import free_port, pattern_bytes, policy_text
from tests.support.metrics import get_metrics, metric_value
from tests.support.raw_upstream import RawUpstream

# --------------------------------------------------------------------------- backoff


def backoff(jitter: str, seed: int = 7, **options) -> Backoff:
    return Backoff(BackoffOptions(jitter=jitter, **options), random.Random(seed))


def test_no_jitter_grows_by_the_multiplier_up_to_max():
    b = backoff("none", initial="25ms", max="150ms", multiplier=2)
    assert [b.delay(n, 0) for n in range(1, 6)] == pytest.approx([0.025, 0.05, 0.1, 0.15, 0.15])


@pytest.mark.parametrize("jitter", ["full", "equal"])
def test_full_and_equal_jitter_stay_within_their_bounds(jitter):
    b = backoff(jitter, initial="10ms", max="1s", multiplier=3)
    for retry in range(1, 9):
        ceiling = min(1.0, 0.01 * 3 ** (retry - 1))
        samples = [b.delay(retry, 0) for _ in range(300)]
        low = 0.0 if jitter == "full" else ceiling / 2
        assert all(low <= s <= ceiling for s in samples)
        # The randomness covers the range, not one point of it.
        assert max(samples) - min(samples) > (ceiling - low) * 0.8


def test_decorrelated_jitter_stays_between_initial_and_three_times_the_previous_capped():
    b = backoff("decorrelated", initial="20ms", max="500ms")
    previous = 0.02
    for retry in range(1, 200):
        wait = b.delay(retry, previous)
        assert 0.02 <= wait <= min(0.5, max(0.02, previous * 3))
        previous = wait
    with pytest.raises(ValidationError, match="cannot be shorter"):
        BackoffOptions(initial="2s", max="1s")


def test_retry_after_seconds_and_http_date():
    def of(value):
        return retry_after_of([(b"content-type", b"text/plain"), (b"retry-after", value)])

    assert of(b"3") == 3.0
    assert of(b"Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # in the past
    future = __import__("email.utils").utils.formatdate(__import__("time").time() + 120, usegmt=True)
    assert 118 <= of(future.encode()) <= 121
    assert of(b"soon") is None
    assert retry_after_of([(b"content-type", b"text/plain")]) is None


def test_retry_options_validation():
    assert RetryOptions(retry_on=[503, "reset", "5xx"]).retry_on == ("503", "reset", "5xx")
    with pytest.raises(ValidationError, match="not a retry condition"):
        RetryOptions(retry_on=["sometimes"])
    with pytest.raises(ValidationError):
        RetryOptions(attempts=0)
    with pytest.raises(ValidationError, match="not an HTTP method"):
        RetryOptions(methods=["FETCH"])
    for bad in ("5", True):  # numbers are numbers: no silent conversion
        with pytest.raises(ValidationError):
            BudgetOptions(min_per_second=bad)
        with pytest.raises(ValidationError):
            BackoffOptions(multiplier=bad)


# --------------------------------------------------------------------------- deadline


class SteppingClock(ManualClock):
    """A ManualClock whose sleep moves time forward at once and records the wait."""

    def __init__(self) -> None:
        super().__init__()
        self.slept: list[tuple[float, float]] = []  # (start, end)

    async def sleep(self, seconds: float) -> None:
        self.slept.append((self.now(), self.now() + seconds))
        self.advance(seconds)
        await asyncio.sleep(0)


def reset_reply() -> LocalReply:
    return LocalReply.from_upstream_error(ResetBeforeHeaders())


@pytest.mark.parametrize("jitter", ["full", "equal", "decorrelated", "none"])
async def test_no_backoff_sleep_passes_the_deadline_and_no_try_starts_after_it(jitter):
    clock = SteppingClock()
    options = RetryOptions(
        attempts=10,
        backoff={"initial": "50ms", "max": "2s", "jitter": jitter},
        budget={"ratio": "100%", "min_per_second": 100},
    )
    tries: list[float] = []

    async def failing(ex):
        tries.append(clock.now())
        clock.advance(0.02)  # each try takes 20ms
        return reset_reply()

    layer = RetryLayer(options, failing, clock, RetryMetrics(Metrics(), "r"))
    for _ in range(20):
        ex = Exchange("GET", b"/", [], b"h", b"", None, None, b"rid", "r", 0.0, deadline=clock.now() + 0.5)
        reply = await layer(ex)
        assert reply.status == 502
        for _, end in clock.slept:
            assert end <= ex.deadline
        assert all(t + 0.02 <= ex.deadline for t in tries)
        assert len(tries) >= 2  # it did retry while time was left
        if len(tries) < 10:
            assert ex.response_headers == [(b"x-fender-retry", b"deadline")]
        clock.slept.clear()
        tries.clear()


# --------------------------------------------------------------------------- budget


def test_budget_limits_retries_to_ratio_plus_reserve_and_refills_after_the_window():
    clock = ManualClock()
    budget = RetryBudget(BudgetOptions(ratio="20%", min_per_second=1, window="10s"), clock)
    granted = 0
    for _ in range(100):
        budget.request()
        granted += budget.try_spend()
    assert granted == 100 * 0.2 + 1 * 10
    assert not budget.try_spend()
    clock.advance(10.5)  # everything counted has left the window
    budget.request()
    assert budget.try_spend()
    assert budget.snapshot() == {"requests": 1, "retries": 1, "allowed": int(1 * 0.2 + 1 * 10)}


def test_budget_window_slides_slice_by_slice():
    # 10s in 1s slices: requests leave the window with their slice, not all at once.
    clock = ManualClock(start=1000.0)
    budget = RetryBudget(BudgetOptions(ratio="20%", min_per_second=0, window="10s"), clock)
    for _ in range(5):
        budget.request(clock.now())
    clock.advance(5.0)
    for _ in range(3):
        budget.request(clock.now())
    clock.advance(4.9)  # 9.9s after the first five: all eight still count
    assert budget.snapshot() == {"requests": 8, "retries": 0, "allowed": int(8 * 0.2)}
    clock.advance(0.2)  # the first five's slice has left
    assert budget.snapshot() == {"requests": 3, "retries": 0, "allowed": int(3 * 0.2)}
    budget.request(clock.now())
    clock.advance(5.0)  # the three have left; the last one stays
    assert budget.snapshot() == {"requests": 1, "retries": 0, "allowed": int(1 * 0.2)}


async def test_hard_down_upstream_attempts_stay_within_requests_times_one_plus_ratio_plus_minimum(
    start_fender,
):
    async with RawUpstream(lambda req, conn: conn.send(503, [], b"down")) as up:
        routes = """
        - name: all
          upstream: echo
          retry:
            attempts: 5
            backoff: {initial: 1ms, max: 1ms, jitter: none}
            budget: {ratio: 20%, min_per_second: 1, window: 60s}
        """
        clock = ManualClock()  # the budget window never moves during the test
        fender = await start_fender(policy_text(up.port, routes=routes), clock=SteppingClockForFender(clock))
        requests = 40
        async with httpx.AsyncClient() as client:
            statuses = [(await client.get(fender.url + f"/{i}")).status_code for i in range(requests)]
        metrics = await get_metrics(fender)
    assert statuses == [503] * requests
    bound = requests * (1 + 0.2) + 1 * 60
    assert requests < len(up.requests) <= bound
    assert metric_value(metrics, "fender_retry_budget_exhausted_total", route="all") > 0
    assert metric_value(metrics, "fender_retry_attempts_total", route="all") == len(up.requests)


class SteppingClockForFender:
    """Wraps a ManualClock so backoff sleeps return at once without moving the budget's time."""

    def __init__(self, clock: ManualClock) -> None:
        self._clock = clock

    def now(self) -> float:
        return self._clock.now()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(0)


# --------------------------------------------------------------------------- real sockets


def flaky_handler():
    """Fails every other request with 503."""
    count = 0

    async def handler(req, conn):
        nonlocal count
        count += 1
        if count % 2:
            await conn.send(503, [], b"flaky")
        else:
            await conn.send(200, [], b"fine")

    return handler


FLAKY_ROUTES = """
- name: all
  upstream: echo
  retry:
    attempts: 3
    backoff: {initial: 1ms, max: 5ms}
    budget: {ratio: 100%, min_per_second: 0}
"""


async def test_flaky_upstream_gives_every_get_client_success(start_fender):
    async with RawUpstream(flaky_handler()) as up:
        fender = await start_fender(policy_text(up.port, routes=FLAKY_ROUTES))
        async with httpx.AsyncClient() as client:
            responses = [await client.get(fender.url + f"/g{i}") for i in range(30)]
        metrics = await get_metrics(fender)
    assert [r.status_code for r in responses] == [200] * 30
    assert all(r.text == "fine" for r in responses)
    # Every first try lands on a failing turn: each request needed exactly one retry.
    assert len(up.requests) == 60
    assert metric_value(metrics, "fender_retries_total", route="all", reason="503") == 30


async def test_post_without_idempotency_key_is_never_sent_twice(start_fender):
    async with RawUpstream(flaky_handler()) as up:
        fender = await start_fender(policy_text(up.port, routes=FLAKY_ROUTES))
        async with httpx.AsyncClient() as client:
            plain = [await client.post(fender.url + "/orders", content=b"{}") for _ in range(10)]
            assert len(up.requests) == 10  # zero extra calls
            keyed = [
                await client.post(fender.url + "/orders", content=b"{}", headers={"idempotency-key": f"k{i}"})
                for i in range(10)
            ]
    assert sorted(r.status_code for r in plain) == [200] * 5 + [503] * 5
    assert all(r.headers["x-fender-retry"] == "not-idempotent" for r in plain if r.status_code == 503)
    assert [r.status_code for r in keyed] == [200] * 10


async def test_connect_failure_is_retried_even_for_post(start_fender):
    routes = """
    - name: all
      upstream: echo
      retry: {attempts: 3, backoff: {initial: 1ms, max: 1ms}}
    """
    fender = await start_fender(policy_text(free_port(), routes=routes))
    async with httpx.AsyncClient() as client:
        r = await client.post(fender.url + "/", content=b"x")
    metrics = await get_metrics(fender)
    assert r.status_code == 502 and r.headers["x-fender-error"] == "connect_failure"
    assert metric_value(metrics, "fender_retries_total", route="all", reason="connect_failure") == 2
    assert metric_value(metrics, "fender_retry_attempts_total", route="all", outcome="connect_failure") == 3


async def test_large_streamed_body_is_not_replayed_unless_max_replay_body_allows(start_fender):
    body = pattern_bytes(100 * 1024)
    seen: dict[bytes, int] = {}

    async def first_try_fails(req, conn):
        seen[req.target] = seen.get(req.target, 0) + 1
        await conn.send(503 if seen[req.target] == 1 else 200, [], b"")

    async with RawUpstream(first_try_fails) as up:
        routes = """
        - name: small
          upstream: echo
          match: {path_prefix: /small}
          retry: {attempts: 3, backoff: {initial: 1ms, max: 1ms}}
        - name: big
          upstream: echo
          retry: {attempts: 3, backoff: {initial: 1ms, max: 1ms}, max_replay_body: 256KiB}
        """
        fender = await start_fender(policy_text(up.port, routes=routes))
        async with httpx.AsyncClient() as client:
            r = await client.put(fender.url + "/small", content=body)
            assert r.status_code == 503 and r.headers["x-fender-retry"] == "not-replayable"
            assert len(up.requests) == 1
            r = await client.put(fender.url + "/big", content=body)
            assert r.status_code == 200
    digest = hashlib.sha256(body).hexdigest()
    assert len(up.requests) == 3
    assert all(hashlib.sha256(req.body).hexdigest() == digest for req in up.requests)


async def test_retry_after_is_honoured_when_it_fits_and_returned_when_it_does_not(start_fender):
    calls = 0

    async def handler(req, conn):
        nonlocal calls
        calls += 1
        if calls == 1:
            await conn.send(503, [(b"retry-after", b"2")], b"later")
        elif calls == 2:
            await conn.send(200, [], b"now")
        else:
            await conn.send(503, [(b"retry-after", b"30")], b"much later")

    clock = ManualClock()
    async with RawUpstream(handler) as up:
        routes = """
        - name: all
          upstream: echo
          timeout: 10s
          retry: {attempts: 3, backoff: {initial: 10ms, max: 10ms, jitter: none}}
        """
        fender = await start_fender(policy_text(up.port, routes=routes), clock=clock)
        async with httpx.AsyncClient() as client:
            pending = asyncio.ensure_future(client.get(fender.url + "/"))
            await up.wait_until(lambda: len(up.requests) == 1)
            for _ in range(200):  # bounded: until the retry layer sleeps
                if clock.sleepers:
                    break
                await asyncio.sleep(0.01)
            assert clock.sleepers == 1
            clock.advance(1.9)
            # Still asleep: it waits the upstream's 2s, not the 10ms backoff.
            assert clock.sleepers == 1 and len(up.requests) == 1 and not pending.done()
            clock.advance(0.1)
            r = await asyncio.wait_for(pending, 5)
            assert (r.status_code, r.text) == (200, "now")
            r = await client.get(fender.url + "/")
            assert r.status_code == 503 and r.headers["x-fender-retry"] == "retry-after"
            assert len(up.requests) == 3


async def test_per_try_timeout_abandons_a_hung_try_and_the_retry_uses_another_replica(start_fender):
    async def hangs(req, conn):
        await conn.hang()

    async with RawUpstream(hangs) as slow, RawUpstream(lambda req, conn: conn.send(200, [], b"ok")) as fast:
        routes = """
        - name: all
          upstream: two
          explain: true
          timeout: 5s
          retry: {attempts: 2, per_try_timeout: 200ms, retry_on: [timeout], backoff: {initial: 1ms, max: 1ms}}
        """
        upstreams = f"""
        two:
          replicas: [{{url: http://127.0.0.1:{slow.port}}}, {{url: http://127.0.0.1:{fast.port}}}]
        """
        fender = await start_fender(policy_text(slow.port, routes=routes, upstreams=upstreams))
        async with httpx.AsyncClient() as client:
            results = [await client.get(fender.url + "/") for _ in range(4)]
    assert [r.status_code for r in results] == [200] * 4
    traces = [r.headers["fender-trace"] for r in results]
    assert any(
        f"try 127.0.0.1:{slow.port} timeout" in t and f"try 127.0.0.1:{fast.port} 200" in t for t in traces
    )
    assert all("retry 1 after timeout" in t for t in traces if "timeout" in t)
