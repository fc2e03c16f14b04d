"""The circuit breaker's pipeline layer: judge each call's outcome, answer at once while open."""

from __future__ import annotations

import math
from typing import Any

from proxy.clock import Clock
from proxy.config.models import Route
from proxy.kernel.classify import Classifier
from proxy.kernel.exchange import Exchange, Handler, LocalReply, Reply
from proxy.kernel.reasons import UPSTREAM_FAULTS
from proxy.policies.breaker.machine import STATE_NAMES, CircuitBreaker, log
from proxy.policies.breaker.options import BreakerOptions
from proxy.policies.context import LayerContext


class BreakerLayer:
    __slots__ = ("breaker", "next", "clock", "_statuses", "_reasons", "_classifier", "_fallback", "_note")

    def __init__(self, breaker: CircuitBreaker, next_handler: Handler, clock: Clock) -> None:
        self.breaker = breaker
        self.next = next_handler
        self.clock = clock
        classifier = Classifier(breaker.options.failure_on)
        self._statuses, self._reasons = classifier.statuses, classifier.reasons
        self._classifier = classifier
        fallback = breaker.options.fallback
        self._fallback: tuple[int, bytes, bytes] | None = None
        if fallback is not None:
            self._fallback = (fallback.status, fallback.body.encode(), fallback.content_type.encode())
        self._note = f"breaker {breaker.name} "

    def _open_reply(self) -> Reply:
        wait = max(1, math.ceil(self.breaker.retry_after()))
        extra = [(b"retry-after", str(wait).encode())]
        if self._fallback is None:
            return LocalReply("breaker_open", f"circuit {self.breaker.name}", headers=extra)
        status, body, content_type = self._fallback
        return LocalReply("breaker_open", status=status, headers=extra, body=body, content_type=content_type)

    async def __call__(self, ex: Exchange) -> Reply:
        breaker = self.breaker
        token = breaker.acquire()
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
            elif reason in UPSTREAM_FAULTS:
                breaker.record(token, False, self.clock.now() - started)
            else:
                # Fender's own answer (bulkhead, limits): says nothing about the upstream.
                breaker.release(token)
        else:
            now = self.clock.now()
            failed = reply.status in self._statuses
            if not failed and self._classifier.grpc:
                failed = self._classifier.grpc_fails(reply.headers) is not None  # trailers-only gRPC answer
            breaker.record(token, failed, now - started, now)
        return reply


def build_layer(route: Route, next_handler: Handler, ctx: LayerContext) -> Handler | None:
    options = route.circuit_breaker
    if options is None:
        return None
    key, owner = _breaker_key(route, options)
    # Routes in one scope with equal settings share the breaker: the same key within a build
    # gives the same object, and a reload with equal settings keeps it (state, name and all).
    breaker = ctx.keep(key, options, lambda: _new_breaker(owner, route, options, ctx))
    ctx.expose("breaker", breaker.name, breaker)
    try:
        ctx.checkpoint(f"breaker/{breaker.name}", breaker.checkpoint_snapshot, breaker.checkpoint_restore)
    except ValueError:
        # Two breakers with one name: the first keeps the checkpoint slot, a restart names them apart.
        log.debug("breaker %s: name taken in this checkpoint, not saved", breaker.name)
    return BreakerLayer(breaker, next_handler, ctx.clock)


def _breaker_key(route: Route, options: BreakerOptions) -> tuple[tuple[str, str, str, BreakerOptions], str]:
    owner = route.name if options.scope == "route" else route.upstream
    return ("breaker", options.scope, owner, options), owner


def _new_breaker(owner: str, route: Route, options: BreakerOptions, ctx: LayerContext) -> CircuitBreaker:
    """A fresh breaker, named so no other breaker of this build has its name (admin API, checkpoints).

    The owner's name when free, else upstream.route (a second breaker for one upstream: other
    settings on another route). Taken are the names of the breakers built so far and those of
    every breaker this build keeps from the previous runtime, which keep their names, even when
    their routes come later in the file.
    """
    taken = set(ctx.exposed_of("breaker"))
    for other in ctx.policy.routes:
        other_options = other.circuit_breaker
        if other_options is not None:
            kept = ctx.reusable(_breaker_key(other, other_options)[0], other_options)
            if kept is not None:
                taken.add(kept.name)
    name = owner if owner not in taken else f"{route.upstream}.{route.name}"
    serial = 2
    while name in taken:
        name = f"{route.upstream}.{route.name}.{serial}"
        serial += 1
    return CircuitBreaker(name, options, ctx.clock, ctx.metrics)


def breakers(exposed: dict[str, dict[str, Any]]) -> list[CircuitBreaker]:
    """Every breaker of a runtime (``runtime.exposed``), in creation order (for the admin API)."""
    return list(exposed.get("breaker", {}).values())
