"""Per-attempt views and hedged requests: the estimate, the race on the injected clock, real sockets."""

from __future__ import annotations

import asyncio
import random
from types import SimpleNamespace

import httpx
import pytest
from pydantic import ValidationError

from proxy.clock import ManualClock
from proxy.config import PolicyError, parse_policy
from proxy.kernel.exchange import Exchange, LocalReply
from proxy.metrics import Metrics
from proxy.policies.context import LayerContext
from proxy.policies.retry.hedge import MIN_SAMPLES, LatencyEstimate
from proxy.policies.retry.layer import build_layer
from proxy.policies.retry.options import HedgeOptions, RetryOptions
from proxy.upstream.errors import ResetBeforeHeaders
from tests.conftest import policy_text
from tests.support.metrics import get_metrics, metric_value
from tests.support.raw_upstream import RawUpstream


def exchange(
    method: str = "GET", deadline: float = float("inf"), headers=None, body: bytes = b""
) -> Exchange:
    return Exchange(
        method, b"/", [], b"h", body, None, None, b"rid", "r", 0.0, request_headers=headers, deadline=deadline
    )


# --------------------------------------------------------------------------- for_attempt


def test_for_attempt_copies_every_slot_and_keeps_per_try_fields_apart():
    ex = exchange()
    ex.trace = []
    ex.upstream_name, ex.replica_name = "up", "old"
    one, two = ex.for_attempt(1.5), ex.for_attempt(None)
    for name in Exchange.__slots__:  # a slot added later without a copy would fail here
        getattr(one, name)
    assert one.try_timeout == 1.5 and two.try_timeout is None
    assert one.replica_name is None and one.upstream_name is None
    # What is the request's is shared: the replicas tried, the response headers, the trace.
    assert one.tried is ex.tried is two.tried
    assert one.response_headers is ex.response_headers and one.trace is ex.trace
    one.replica_name, one.upstream_name = "a", "up"
    two.replica_name, two.upstream_name = "b", "up"
    one.headers = [(b"traceparent", b"1")]
    assert ex.headers == [] and two.headers == []
    ex.settle(two)
    assert (ex.replica_name, ex.upstream_name) == ("b", "up")


# --------------------------------------------------------------------------- the estimate


def test_latency_estimate_follows_the_percentile_within_a_bucket_and_adapts():
    rng = random.Random(24)
    estimate = LatencyEstimate(0.95)
    samples = []
    for _ in range(MIN_SAMPLES - 1):
        estimate.observe(0.01)
        samples.append(0.01)
    assert estimate.value is None  # too few tries seen
    for _ in range(3000):
        s = rng.lognormvariate(-4.0, 0.6)  # ~18ms median, a long tail
        estimate.observe(s)
        samples.append(s)
    exact = sorted(samples[-1500:])[int(0.95 * 1500)]
    assert exact * 0.8 <= estimate.value <= exact * 1.3
    # The upstream gets ten times slower: within a few thousand tries the estimate follows.
    for _ in range(4000):
        estimate.observe(rng.lognormvariate(-4.0, 0.6) * 10)
    assert estimate.value > exact * 6
    assert len(estimate._counts) == 96  # fixed memory whatever came in
    estimate.observe(0.0)
    estimate.observe(1e9)  # out of range both ways: clamped, no error
    assert len(estimate._counts) == 96


def test_hedge_options_validation():
    assert HedgeOptions().after == "p95" and HedgeOptions().budget == 0.05
    assert HedgeOptions(after="40ms").after == pytest.approx(0.04)
    assert HedgeOptions(after="p99.9").after == "p99.9"
    for bad in ("p40", "p100", "pfast", "0ms", "soon", 5):
        with pytest.raises(ValidationError):
            HedgeOptions(after=bad)
    with pytest.raises(ValidationError):
        HedgeOptions(max_extra=0)
    with pytest.raises(ValidationError):
        HedgeOptions(budget="0%")


def test_a_bad_hedge_is_refused_with_file_line_and_column():
    text = policy_text(1, routes="- name: r\n  upstream: echo\n  hedge:\n    after: p40\n")
    with pytest.raises(PolicyError) as caught:
        parse_policy(text, "p.yaml")
    assert "p.yaml:" in str(caught.value) and "percentile" in str(caught.value)
    assert parse_policy(text.replace("p40", "p95"), "p.yaml").routes[0].hedge.after == "p95"


# --------------------------------------------------------------------------- the race (injected clock)


class FakeReply:
    def __init__(self, status: int, replica: str) -> None:
        self.status = status
        self.headers: list = []
        self.replica = replica
        self.closed = False

    def close(self) -> None:
        self.closed = True


class Replicas:
    """A forwarder stand-in: the first try of a request goes to ``a``, a hedge to ``b``.

    Each try takes ``latency(replica)`` seconds of the manual clock. Cancelled tries are counted.
    """

    def __init__(self, clock: ManualClock, latency) -> None:
        self.clock = clock
        self.latency = latency
        self.calls: dict[str, int] = {"a": 0, "b": 0}
        self.cancelled = 0
        self.replies: list[FakeReply] = []

    async def __call__(self, ex: Exchange):
        replica = "b" if "a" in ex.tried else "a"
        ex.tried.append(replica)
        ex.upstream_name, ex.replica_name = "up", replica
        self.calls[replica] += 1
        latency = self.latency(replica)
        try:
            await self.clock.sleep(0 if latency == "reset" else latency)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        if latency == "reset":
            return LocalReply.from_upstream_error(ResetBeforeHeaders())
        reply = FakeReply(200, replica)
        self.replies.append(reply)
        return reply


def hedged_layer(clock, forward, hedge: dict, retry: dict | None = None):
    metrics = Metrics()
    route = SimpleNamespace(
        name="r",
        retry=RetryOptions(**retry) if retry is not None else None,
        hedge=HedgeOptions(**hedge),
    )
    ctx = LayerContext(metrics=metrics, upstream=None, policy=None, clock=clock)  # type: ignore[arg-type]
    return build_layer(route, forward, ctx), ctx.exposed["hedge"]["r"], metrics


async def drive(clock: ManualClock, coroutine, step: float = 0.001, limit: int = 100_000):
    """Run ``coroutine`` while moving the manual clock in steps (bounded in steps)."""
    task = asyncio.ensure_future(coroutine)
    for _ in range(limit):
        for _ in range(6):
            await asyncio.sleep(0)
        if task.done():
            return task.result()
        clock.advance(step)
    task.cancel()
    raise AssertionError("the request did not finish in the steps allowed")


def counter(metrics: Metrics, name: str, **labels) -> float:
    return metric_value(
        __import__("prometheus_client").generate_latest(metrics.registry).decode(), name, **labels
    )


async def test_slow_tail_gets_hedged_and_the_hedge_wins():
    clock = ManualClock()
    rng = random.Random(2024)
    slow_plan = [rng.random() < 0.10 for _ in range(200)]  # a's seeded slow tail: 10% take 500ms
    plan = iter(slow_plan)
    state = {"slow": False}

    def latency(replica):
        if replica == "a":
            state["slow"] = next(plan)
            return 0.5 if state["slow"] else 0.01
        return 0.01

    replicas = Replicas(clock, latency)
    layer, hedger, metrics = hedged_layer(clock, replicas, {"after": "50ms", "budget": "20%"})
    winners = []
    for _ in range(200):
        ex = exchange()
        reply = await drive(clock, layer(ex))
        winners.append(reply.replica)
        assert ex.replica_name == reply.replica  # the request names the try that won
    slow = sum(slow_plan)
    assert slow > 0
    assert hedger.sent == slow == counter(metrics, "fender_hedges_sent_total", route="r")
    assert hedger.won == slow == counter(metrics, "fender_hedge_winners_total", route="r", winner="hedge")
    assert counter(metrics, "fender_hedge_winners_total", route="r", winner="first") == 0
    assert winners.count("b") == slow and replicas.calls == {"a": 200, "b": slow}
    assert replicas.cancelled == slow  # every losing slow try was cancelled mid-flight


async def test_percentile_mode_waits_for_samples_then_hedges_the_slowest():
    clock = ManualClock()
    count = {"n": 0}

    def latency(replica):
        if replica == "a":
            count["n"] += 1
            return 0.4 if count["n"] % 50 == 0 else 0.01 + (count["n"] % 7) * 0.001  # 2% slow
        return 0.01

    replicas = Replicas(clock, latency)
    layer, hedger, metrics = hedged_layer(clock, replicas, {"after": "p95", "budget": "10%"})
    for _ in range(MIN_SAMPLES - 1):
        await drive(clock, layer(exchange()))
    assert hedger.delay() is None and hedger.sent == 0
    for _ in range(400):
        await drive(clock, layer(exchange()))
    assert 0.01 <= hedger.delay() <= 0.03  # p95 of the fast 98%, within a bucket
    slow_after_warmup = sum(1 for n in range(MIN_SAMPLES, 420) if (n + 1) % 50 == 0)
    assert hedger.won == slow_after_warmup  # each slow try was hedged, and the hedge won
    assert hedger.sent >= hedger.won


async def test_hedges_stop_at_the_hedge_budget_under_a_slow_replica():
    clock = ManualClock()
    replicas = Replicas(clock, lambda replica: 0.06 if replica == "a" else 0.01)  # a is always slow
    layer, hedger, metrics = hedged_layer(clock, replicas, {"after": "20ms", "budget": "5%"})
    for _ in range(100):  # ~6s of manual time: inside the 10s budget window
        await drive(clock, layer(exchange()))
    assert hedger.sent == 5  # 5% of 100 requests, not 100
    assert counter(metrics, "fender_hedges_skipped_total", route="r", reason="budget") == 95
    assert counter(metrics, "fender_hedges_sent_total", route="r") == 5


async def test_no_hedge_while_the_retry_budget_is_spent():
    clock = ManualClock()
    replicas = Replicas(clock, lambda replica: 0.06 if replica == "a" else 0.01)
    retry = {"attempts": 1, "budget": {"ratio": "1%", "min_per_second": 0, "window": "10s"}}
    layer, hedger, metrics = hedged_layer(clock, replicas, {"after": "20ms", "budget": "50%"}, retry)
    for _ in range(100):
        await drive(clock, layer(exchange()))
    assert hedger.sent == 1  # the retry budget (1% of 100) allowed one
    assert counter(metrics, "fender_hedges_skipped_total", route="r", reason="retry_budget") == 49


async def test_never_hedged_non_idempotent_unreplayable_or_past_the_deadline():
    clock = ManualClock()
    replicas = Replicas(clock, lambda replica: 0.06)
    layer, hedger, metrics = hedged_layer(clock, replicas, {"after": "20ms", "budget": "100%"})
    await drive(clock, layer(exchange("POST")))
    await drive(clock, layer(exchange("GET", body=b"x" * 70_000)))  # beyond max_replay_body
    await drive(clock, layer(exchange("GET", deadline=clock.now() + 0.03)))  # 10ms left at 20ms
    assert hedger.sent == 0 and replicas.calls["b"] == 0
    for reason in ("not_idempotent", "not_replayable", "deadline"):
        assert counter(metrics, "fender_hedges_skipped_total", route="r", reason=reason) == 1
    # With an Idempotency-Key a POST may be hedged.
    reply = await drive(clock, layer(exchange("POST", headers=[(b"idempotency-key", b"k1")])))
    assert hedger.sent == 1 and replicas.calls["b"] == 1 and reply.replica in ("a", "b")


async def test_a_failing_try_does_not_win_while_the_other_runs():
    clock = ManualClock()
    # a answers slowly but well; the hedge to b resets at once: a's answer is the one kept.
    replicas = Replicas(clock, lambda replica: 0.05 if replica == "a" else "reset")
    layer, hedger, metrics = hedged_layer(clock, replicas, {"after": "20ms", "budget": "100%"})
    ex = exchange()
    ex.trace = []
    reply = await drive(clock, layer(ex))
    assert reply.status == 200 and reply.replica == "a" and ex.replica_name == "a"
    assert counter(metrics, "fender_hedge_winners_total", route="r", winner="first") == 1
    assert any(n.startswith("hedge 1 sent after") for n in ex.trace)
    assert "hedge race won by first try (a)" in ex.trace


# --------------------------------------------------------------------------- real sockets


async def test_real_sockets_slow_tail_replica_hedged_to_the_fast_one(start_fender):
    rng = random.Random(7)
    slow_plan: list[bool] = []  # a's seeded decisions, one per request it gets: 10% hang
    release = asyncio.Event()

    async def tail(req, conn):
        slow_plan.append(rng.random() < 0.10)
        if slow_plan[-1]:
            await release.wait()  # slower than any hedge delay: the hedge must win
        await conn.send(200, [], b"a")

    async def fast(req, conn):
        await conn.send(200, [], b"b")

    async with RawUpstream(tail) as a, RawUpstream(fast) as b:
        upstreams = f"""
        pair:
          replicas: [{{url: "http://127.0.0.1:{a.port}"}}, {{url: "http://127.0.0.1:{b.port}"}}]
          balance: round_robin
        """
        routes = """
        - name: r
          upstream: pair
          explain: true
          hedge: {after: 1s, budget: 50%}
        """
        fender = await start_fender(policy_text(a.port, routes=routes, upstreams=upstreams))
        bodies = []
        traces = []
        async with httpx.AsyncClient(timeout=10) as client:
            for i in range(40):  # round robin: a gets about every other first try
                response = await client.get(fender.url + f"/{i}")
                assert response.status_code == 200
                bodies.append(response.text)
                traces.append(response.headers.get("fender-trace", ""))
            metrics = await get_metrics(fender)
            status = (await client.get(fender.admin_url + "/admin/status")).json()
        release.set()
    slow = sum(slow_plan)
    assert slow > 0
    assert metric_value(metrics, "fender_hedges_sent_total", route="r") == slow
    assert metric_value(metrics, "fender_hedge_winners_total", route="r", winner="hedge") == slow
    assert sum("won by hedge 1" in t for t in traces) == slow
    assert bodies.count("a") == len(slow_plan) - slow and len(a.requests) == len(slow_plan)
    assert len(b.requests) == 40 - len(slow_plan) + slow  # its own share plus one hedge per slow try
    hedge = next(r for r in status["routes"] if r["name"] == "r")["hedge"]
    assert hedge["sent"] == slow and hedge["won"] == slow and hedge["delay_seconds"] == 1.0
