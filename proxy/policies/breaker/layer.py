"""The circuit breaker's pipeline layer: judge each call's outcome, answer at once while open."""

from __future__ import annotations

import math
from typing import Any

from proxy.clock import Clock
from proxy.config.models import Route
from proxy.kernel.exchange import Exchange, Handler, LocalReply, Reply
from proxy.kernel.reasons import UPSTREAM_FAULTS
from proxy.policies.breaker.machine import CLOSED, STATE_NAMES, CircuitBreaker, log
from proxy.policies.breaker.options import BreakerOptions
from proxy.policies.context import LayerContext
from proxy.policies.outcome import GRPC_CONDITIONS, grpc_code, grpc_codes


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
            elif reason in UPSTREAM_FAULTS:
                breaker.record(token, False, self.clock.now() - started)
            else:
                breaker.release(
                    token
                )  # Fender's own answer (bulkhead, limits): says nothing about the upstream
        else:
            now = self.clock.now()
            failed = reply.status in self._statuses
            if self._grpc and not failed:
                failed = grpc_code(reply) in self._grpc  # a trailers-only gRPC answer (policies/outcome.py)
            breaker.record(token, failed, now - started, now)
        return reply


def build_layer(route: Route, next_handler: Handler, ctx: LayerContext) -> Handler | None:
    options = route.circuit_breaker
    if options is None:
        return None
    if options.scope == "route":
        owner = route.name
    else:
        owner = route.upstream
    # Routes in one scope with equal settings share the breaker: the same key within a build
    # gives the same object, and a reload with equal settings keeps it (state and all).
    key = ("breaker", options.scope, owner, options)
    breaker = ctx.keep(key, options, lambda: _new_breaker(owner, route, options, ctx))
    ctx.expose("breaker", breaker.name, breaker)
    try:
        ctx.checkpoint(f"breaker/{breaker.name}", breaker.checkpoint_snapshot, breaker.checkpoint_restore)
    except ValueError:
        # Two breakers with one name: the first keeps the checkpoint slot, a restart names them apart.
        log.debug("breaker %s: name taken in this checkpoint, not saved", breaker.name)
    return BreakerLayer(breaker, next_handler, ctx.clock)


def _new_breaker(owner: str, route: Route, options: BreakerOptions, ctx: LayerContext) -> CircuitBreaker:
    # A second breaker for one upstream (other settings on another route) is named upstream.route.
    name = owner if owner not in ctx.exposed_of("breaker") else f"{route.upstream}.{route.name}"
    return CircuitBreaker(name, options, ctx.clock, ctx.metrics)


def breakers(exposed: dict[str, dict[str, Any]]) -> list[CircuitBreaker]:
    """Every breaker of a runtime (``runtime.exposed``), in creation order (for the admin API)."""
    return list(exposed.get("breaker", {}).values())
