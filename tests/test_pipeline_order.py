"""The layer order of a route's pipeline is fixed: the whole chain, and what the order promises."""

from __future__ import annotations

import asyncio

import httpx

from proxy.clock import ManualClock
from proxy.dataplane import pipeline
from proxy.dataplane.forward import Forwarder
from tests.conftest import policy_text
from tests.support.procs import wait_until
from tests.support.raw_upstream import RawUpstream, ok, sequence, status

EVERY_POLICY = """
- name: all
  upstream: echo
  timeout: 30s
  rate_limit: {rate: 100/s, burst: 10}
  cache: {}
  circuit_breaker: {consecutive_failures: 5}
  bulkhead: {max_concurrent: 4, max_queued: 0}
  retry: {attempts: 2}
"""


def _owner(handler):
    """The layer object behind a handler (pipeline.py keeps objects as their bound ``__call__``)."""
    return getattr(handler, "__self__", handler)


async def test_every_layer_wraps_the_next_in_the_documented_order(monkeypatch, start_fender):
    # Record what each policy module's build_layer wrapped, then walk the chain from the outside in.
    wrapped: dict[int, tuple[str, object, object]] = {}  # id(layer) -> (policy, layer, what it wraps)
    recorded = []
    for field, build in pipeline.ORDER:

        def recording(route, next_handler, ctx, _build=build, _policy=field):
            layer = _build(route, next_handler, ctx)
            if layer is not None:
                wrapped[id(layer)] = (_policy, layer, _owner(next_handler))
            return layer

        recorded.append((field, recording))
    monkeypatch.setattr(pipeline, "ORDER", tuple(recorded))
    async with RawUpstream(ok()) as up:
        fender = await start_fender(policy_text(up.port, routes=EVERY_POLICY))
        handler = _owner(fender.runtime.routes[0].pipeline)
        chain = []
        while id(handler) in wrapped and wrapped[id(handler)][1] is handler:
            policy, _, handler = wrapped[id(handler)]
            chain.append(policy)
        assert chain == ["rate_limit", "cache", "circuit_breaker", "bulkhead", "retry"]
        assert isinstance(handler, Forwarder)
        async with httpx.AsyncClient() as client:
            assert (await client.get(fender.url + "/")).status_code == 200  # the chain serves


async def test_retries_inside_the_route_keep_the_bulkhead_slot_through_the_backoff(start_fender):
    # Retry sits inside the bulkhead: a request waiting to retry still holds its slot, so a second
    # request finds the (one-slot) bulkhead full instead of taking the slot during the backoff.
    clock = ManualClock()
    routes = """
    - name: guarded
      upstream: echo
      timeout: 30s
      bulkhead: {max_concurrent: 1, max_queued: 0}
      retry: {attempts: 2, backoff: {initial: 5s, max: 5s, jitter: none}}
    """
    async with RawUpstream(sequence(status(503), ok(b"retried"), ok(b"second"))) as up:
        fender = await start_fender(policy_text(up.port, routes=routes), clock=clock)
        async with httpx.AsyncClient(timeout=30) as client:
            first = asyncio.ensure_future(client.get(fender.url + "/first"))
            try:
                await wait_until(lambda: clock.sleepers == 1)  # the retry layer is in its backoff
                second = await client.get(fender.url + "/second")
                clock.advance(5)
                retried = await asyncio.wait_for(first, 10)
            finally:
                first.cancel()
    assert second.status_code == 503 and second.headers["x-fender-error"] == "bulkhead_full"
    assert (retried.status_code, retried.text) == (200, "retried")
    assert [r.target for r in up.requests] == [b"/first", b"/first"]
