"""The bulkhead's pipeline layer: a slot per request, held until the response body ends."""

from __future__ import annotations

import math
import weakref
from typing import Any

from proxy.clock import Clock
from proxy.config.models import Route
from proxy.kernel.exchange import ClientGone, Exchange, Handler, LocalReply, Reply, wait_disconnect
from proxy.metrics import Metrics
from proxy.policies.bulkhead.bulkhead import Bulkhead, ClientLeft, Rejected, SlotReply
from proxy.policies.bulkhead.options import BulkheadOptions
from proxy.policies.context import LayerContext


class RouteBulkhead:
    """A route's bulkhead with its metric children, built once per policy load."""

    def __init__(self, route_name: str, options: BulkheadOptions, clock: Clock, metrics: Metrics) -> None:
        self.options = options
        self.bulkhead = Bulkhead(options.max_concurrent, options.max_queued, options.queue_timeout, clock)
        self.clock = clock
        self.retry_after = b"%d" % math.ceil(options.retry_after)
        self.rejected = {
            reason: metrics.bulkhead_rejected.labels(route_name, reason)
            for reason in ("bulkhead_full", "bulkhead_timeout")
        }
        # Queued requests whose client went away (no answer is sent; counted for the operator).
        self.client_left = metrics.bulkhead_rejected.labels(route_name, "client_gone")
        self.queue_wait = metrics.bulkhead_queue_wait.labels(route_name)
        ref = weakref.ref(self.bulkhead)
        metrics.bulkhead_in_flight.labels(route_name).set_function(lambda: _read(ref, "in_flight"))
        metrics.bulkhead_queued.labels(route_name).set_function(lambda: _read(ref, "queued"))

    def reject(self, reason: str, ex: Exchange) -> LocalReply:
        self.rejected[reason].inc()
        ex.note(reason)
        return LocalReply(reason, headers=[(b"retry-after", self.retry_after)])

    def snapshot(self) -> dict[str, Any]:
        b = self.bulkhead
        return {
            "max_concurrent": b.max_concurrent,
            "in_flight": b.in_flight,
            "max_queued": b.max_queued,
            "queued": b.queued,
            "queue_timeout_seconds": b.queue_timeout,
        }


def _read(ref: weakref.ref[Bulkhead], attribute: str) -> float:
    target = ref()
    return float(getattr(target, attribute)) if target is not None else 0.0


def build_layer(route: Route, next_handler: Handler, ctx: LayerContext) -> Handler | None:
    options = route.bulkhead
    if options is None:
        return None
    state = RouteBulkhead(route.name, options, ctx.clock, ctx.metrics)
    _keep_bulkhead(state, route.name, options, ctx)
    ctx.expose("bulkhead", route.name, state)
    bulkhead = state.bulkhead
    clock = ctx.clock

    async def bulkhead_layer(ex: Exchange) -> Reply:
        if not bulkhead.try_acquire():
            receive = getattr(ex, "receive", None)
            disconnect = None if receive is None else (lambda: wait_disconnect(receive))
            try:
                waited = await bulkhead.acquire(ex.deadline - clock.now(), disconnect)
            except Rejected as rejected:
                if rejected.reason == "bulkhead_timeout":
                    state.queue_wait.observe(rejected.waited)
                return state.reject(rejected.reason, ex)
            except ClientLeft:
                state.client_left.inc()

                raise ClientGone from None
            state.queue_wait.observe(waited)
            ex.note(f"bulkhead queued {waited * 1000:.1f}ms")
        try:
            reply = await next_handler(ex)
        except BaseException:
            bulkhead.release()
            raise
        if reply.complete or not reply.has_body():
            # Nothing more will come from the upstream (a local reply, no body, or the whole
            # body already received): the slot is free now, no need to hold it while it is sent.
            bulkhead.release()
            return reply
        return SlotReply(reply, bulkhead)

    return bulkhead_layer


def _keep_bulkhead(
    state: RouteBulkhead, route_name: str, options: BulkheadOptions, ctx: LayerContext
) -> None:
    """On a reload, reuse the route's previous Bulkhead when its settings are equal (see carry_over)."""
    fresh = state.bulkhead
    state.bulkhead = ctx.keep(("bulkhead", route_name), options, lambda: fresh)
    if state.bulkhead is not fresh:
        ref = weakref.ref(state.bulkhead)
        ctx.metrics.bulkhead_in_flight.labels(route_name).set_function(lambda: _read(ref, "in_flight"))
        ctx.metrics.bulkhead_queued.labels(route_name).set_function(lambda: _read(ref, "queued"))
