"""Adaptive concurrency: the gradient limit against a queueing upstream (injected clock), the LIFO
queue and its shedding, options, and a real-socket 503 concurrency_limited."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import httpx
import pytest
from pydantic import ValidationError

from proxy.clock import ManualClock
from proxy.config import PolicyError, parse_policy
from proxy.kernel.exchange import Exchange, LocalReply
from proxy.metrics import Metrics
from proxy.policies.adaptive.layer import build_layer
from proxy.policies.adaptive.limit import GradientLimit, Shed
from proxy.policies.adaptive.options import AdaptiveConcurrencyOptions
from proxy.policies.context import LayerContext
from tests.conftest import policy_text
from tests.support.metrics import get_metrics, metric_value
from tests.support.raw_upstream import RawUpstream

KNEE = 20  # the upstream serves this many at once at its base latency; beyond, each waits its turn
STEP = 0.005


class Reply:
    status = 200
    headers: list = []

    def close(self) -> None:
        pass


class QueueingUpstream:
    """Latency = base x max(1, in_flight / KNEE): a server with KNEE workers and a queue."""

    def __init__(self, clock: ManualClock) -> None:
        self.clock = clock
        self.base = 0.02
        self.active = 0

    async def __call__(self, ex):
        self.active += 1
        try:
            await self.clock.sleep(self.base * max(1.0, self.active / KNEE))
        finally:
            self.active -= 1
        return Reply()


def exchange() -> Exchange:
    return Exchange("GET", b"/", [], b"h", b"", None, None, b"rid", "r", 0.0)


async def test_limit_converges_near_the_knee_falls_and_sheds_when_slow_and_rises_on_recovery():
    clock = ManualClock()
    upstream = QueueingUpstream(clock)
    options = AdaptiveConcurrencyOptions(min=4, max=1000, max_queued=50, queue_timeout="100ms")
    ctx = LayerContext(metrics=Metrics(), upstream=None, policy=None, clock=clock)  # type: ignore[arg-type]
    layer = build_layer(SimpleNamespace(name="r", adaptive_concurrency=options), upstream, ctx)
    limiter: GradientLimit = ctx.exposed["adaptive"]["r"]
    shed = {"n": 0}
    stop = asyncio.Event()

    async def client() -> None:
        while not stop.is_set():
            reply = await layer(exchange())
            if isinstance(reply, LocalReply):
                assert reply.reason == "concurrency_limited" and reply.status == 503
                shed["n"] += 1
                await clock.sleep(0.05)  # a refused client comes back a little later

    clients = [asyncio.ensure_future(client()) for _ in range(60)]
    history: list[tuple[float, float]] = []  # (seconds since start, limit)
    start = clock.now()

    async def run(seconds: float) -> None:
        for _ in range(int(seconds / STEP)):
            clock.advance(STEP)
            for _ in range(4):
                await asyncio.sleep(0)
            history.append((clock.now() - start, limiter.limit))

    try:
        await run(20)  # steady load: 60 clients, three times what the upstream serves at base latency
        steady = [limit for t, limit in history if t > 10]
        assert all(KNEE * 0.8 <= limit <= KNEE * 3 for limit in steady), (min(steady), max(steady))
        assert min(limit for t, limit in history if t > 1) > options.min  # no dip to min
        shed_steady = shed["n"]
        upstream.base = 0.06  # the upstream slows down three times
        await run(5)
        fallen = history[-1][1]
        # Three times slower: within 5 s the limit is well down (it settles near the knee again,
        # where the tripled latency is what the headroom balances), and the excess is shed.
        assert fallen < min(steady) * 0.6
        assert shed["n"] > shed_steady
        assert fallen > options.min  # fell, but not to the floor
        upstream.base = 0.02  # recovery
        await run(20)
        assert history[-1][1] > fallen * 1.8  # the limit rose again
    finally:
        stop.set()
        for task in clients:
            task.cancel()
        await asyncio.gather(*clients, return_exceptions=True)


async def test_lifo_queue_serves_the_newest_first_and_sheds_the_oldest_when_full():
    clock = ManualClock()
    limiter = GradientLimit(AdaptiveConcurrencyOptions(min=1, max=1, max_queued=2, queue_timeout="1s"), clock)
    assert limiter.try_acquire() and not limiter.try_acquire()
    order: list[str] = []

    async def wait(name: str) -> None:
        try:
            await limiter.acquire(1.0)
            order.append(name)
        except Shed as shed:
            order.append(f"{name}:{shed.reason}")

    first = asyncio.ensure_future(wait("first"))
    await asyncio.sleep(0)
    second = asyncio.ensure_future(wait("second"))
    await asyncio.sleep(0)
    third = asyncio.ensure_future(wait("third"))  # the queue holds 2: first is shed
    for _ in range(3):
        await asyncio.sleep(0)
    assert order == ["first:queue_full"]
    limiter.release(0.01)  # the slot goes to the newest waiter
    await asyncio.sleep(0)
    assert order == ["first:queue_full", "third"]
    clock.advance(1.0)  # second waited its whole queue_timeout
    await asyncio.gather(first, second, third)
    assert order == ["first:queue_full", "third", "second:queue_timeout"]
    assert limiter.in_flight == 1 and limiter.queued == 0


def test_options_validation():
    with pytest.raises(ValidationError, match="at least min"):
        AdaptiveConcurrencyOptions(min=10, max=5)
    with pytest.raises(ValidationError, match="between min and max"):
        AdaptiveConcurrencyOptions(min=10, max=50, initial=5)
    with pytest.raises(ValidationError):
        AdaptiveConcurrencyOptions(tolerance=0.5)
    text = policy_text(1, routes="- name: r\n  upstream: echo\n  adaptive_concurrency: {min: 9, max: 3}\n")
    with pytest.raises(PolicyError) as caught:
        parse_policy(text, "p.yaml")
    assert "p.yaml:" in str(caught.value) and "max" in str(caught.value)


async def test_real_sockets_beyond_the_limit_requests_get_503_concurrency_limited(start_fender):
    release = asyncio.Event()

    async def held(req, conn):
        await release.wait()
        await conn.send(200, [], b"ok")

    async with RawUpstream(held) as up:
        routes = """
        - name: r
          upstream: echo
          explain: true
          adaptive_concurrency: {min: 1, max: 2, initial: 2, max_queued: 1, queue_timeout: 50ms}
        """
        fender = await start_fender(policy_text(up.port, routes=routes))
        async with httpx.AsyncClient(timeout=10) as client:
            holding = [asyncio.ensure_future(client.get(fender.url + f"/{i}")) for i in range(2)]
            await up.wait_until(lambda: len(up.requests) == 2)
            refused = await client.get(fender.url + "/third")  # queued, then out of time
            metrics = await get_metrics(fender)
            status = (await client.get(fender.admin_url + "/admin/status")).json()
            release.set()
            answers = await asyncio.gather(*holding)
    assert refused.status_code == 503
    assert refused.headers["x-fender-error"] == "concurrency_limited"
    assert "concurrency_limited: queue_timeout" in refused.headers["fender-trace"]
    assert [a.status_code for a in answers] == [200, 200]
    assert (
        metric_value(metrics, "fender_adaptive_concurrency_shed_total", route="r", reason="queue_timeout")
        == 1
    )
    assert metric_value(metrics, "fender_adaptive_concurrency_limit", route="r") == 2
    route = next(r for r in status["routes"] if r["name"] == "r")
    assert route["adaptive_concurrency"]["limit"] == 2 and route["adaptive_concurrency"]["in_flight"] == 2
