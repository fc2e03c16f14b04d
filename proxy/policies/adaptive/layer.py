"""The adaptive concurrency layer: a slot under the route's gradient limit per request.

The slot is held from admission until the response head (the latency the limit learns from is
the time to the head, across the request's tries); beyond the limit the request waits in the
LIFO queue, and a request that gets no slot is answered 503 ``concurrency_limited``.
"""

from __future__ import annotations

import weakref

from proxy.config.models import Route
from proxy.kernel.exchange import Exchange, Handler, LocalReply, Reply
from proxy.policies.adaptive.limit import GradientLimit, Shed
from proxy.policies.adaptive.options import AdaptiveConcurrencyOptions
from proxy.policies.context import LayerContext


def build_layer(route: Route, next_handler: Handler, ctx: LayerContext) -> Handler | None:
    options: AdaptiveConcurrencyOptions | None = getattr(route, "adaptive_concurrency", None)
    if options is None:
        return None
    clock = ctx.clock
    # Kept across reloads with equal settings: the limit is what the route learnt.
    limiter = ctx.keep(("adaptive", route.name), options, lambda: GradientLimit(options, clock))
    ctx.expose("adaptive", route.name, limiter)
    metrics = ctx.metrics
    shed = {why: metrics.adaptive_shed.labels(route.name, why) for why in ("queue_full", "queue_timeout")}
    ref = weakref.ref(limiter)
    metrics.adaptive_limit.labels(route.name).set_function(lambda: _read(ref, "limit"))
    metrics.adaptive_in_flight.labels(route.name).set_function(lambda: _read(ref, "in_flight"))
    retry_after = [(b"retry-after", b"1")]

    async def adaptive_layer(ex: Exchange) -> Reply:
        if not limiter.try_acquire():
            try:
                waited = await limiter.acquire(min(options.queue_timeout, ex.deadline - clock.now()))
            except Shed as refused:
                limiter.shed += 1
                shed[refused.reason].inc()
                ex.note(f"concurrency_limited: {refused.reason} (limit {int(limiter.limit)})")
                return LocalReply(
                    "concurrency_limited", refused.reason.replace("_", " "), headers=retry_after
                )
            ex.note(f"adaptive limit {int(limiter.limit)}: queued {waited * 1000:.1f}ms")
        started = clock.now()
        try:
            reply = await next_handler(ex)
        except BaseException:
            limiter.release(None)
            raise
        # Fender's own answers (faults, refusals) say nothing of the upstream's latency under load.
        limiter.release(None if isinstance(reply, LocalReply) else clock.now() - started)
        return reply

    return adaptive_layer


def _read(ref: weakref.ref[GradientLimit], attribute: str) -> float:
    target = ref()
    return float(getattr(target, attribute)) if target is not None else 0.0
