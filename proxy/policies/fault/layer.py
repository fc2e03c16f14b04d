"""The fault injection layer: delays and aborts at the place of the upstream, one try at a time.

The layer sits innermost (last in :data:`proxy.policies.chain.ORDER`, just around the forwarder),
so every other layer meets an injected fault exactly as it would meet a real one: a delayed try
counts against the retry layer's per-try timeout and the route's deadline (a delay that
outlasts them ends as the ``timeout`` a slow upstream gives), holds its bulkhead slot and is
timed by the breaker; an aborted try is an answer with the configured status, which ``retry_on``,
``failure_on`` and the cache's stale-if-error judge by that status, as an upstream's answer.
Only its ``X-Fender-Error: fault_injected`` tells it apart. Each try draws on its own, like a
flaky upstream, so a retried request may be faulted again or not.
"""

from __future__ import annotations

import random

from proxy.config.models import Route
from proxy.kernel.exchange import Exchange, Handler, LocalReply, Reply
from proxy.kernel.reasons import REASON_TEXT
from proxy.policies.context import LayerContext
from proxy.policies.fault.injector import NOTHING, FaultInjector
from proxy.policies.fault.options import FaultOptions

__all__ = ["FaultReply", "build_layer"]

REASON = "fault_injected"


class FaultReply:
    """An injected abort: a complete answer of the configured status, judged like the upstream's.

    Not a :class:`LocalReply` on purpose: layers that tell Fender's own refusals from upstream
    answers (retry, breaker, cache) must take this one for an upstream answer.
    """

    __slots__ = ("status", "headers", "body", "_sent")

    complete = True
    trailers: list[tuple[bytes, bytes]] | None = None

    def __init__(self, status: int, route: str) -> None:
        self.status = status
        self.body = f"fender: {REASON_TEXT[REASON]} (route {route}, status {status})\n".encode()
        self.headers = [
            (b"content-type", b"text/plain; charset=utf-8"),
            (b"content-length", b"%d" % len(self.body)),
            (b"x-fender-error", REASON.encode()),
        ]
        self._sent = False

    def has_body(self) -> bool:
        return True

    async def read(self) -> bytes:
        if self._sent:
            return b""
        self._sent = True
        return self.body

    def close(self) -> None:
        self._sent = True


def build_layer(route: Route, next_handler: Handler, ctx: LayerContext) -> Handler | None:
    options: FaultOptions | None = route.fault
    if options is None:
        return None
    name = route.name
    # The running injector (with any change an operator made) survives a reload with equal settings.
    injector = ctx.keep(("fault", name), options, lambda: FaultInjector(name, options, _rng(options)))
    ctx.expose("fault", name, injector)
    family = ctx.metrics.faults_injected
    count_delay = family.labels(name, "delay").inc
    count_abort = family.labels(name, "abort").inc
    clock = ctx.clock
    injected = injector.injected

    async def fault_layer(ex: Exchange) -> Reply:
        if not injector.enabled or (injector.match and not injector.eligible(ex.request_headers)):
            return await next_handler(ex)
        choice = injector.choose()
        if choice is NOTHING:
            return await next_handler(ex)
        delay, status = choice
        injector.active += 1
        try:
            if delay is not None:
                now = clock.now()
                left = ex.deadline - now
                per_try = ex.try_timeout
                if per_try is not None and per_try < left:
                    left = per_try
                count_delay()
                injected["delay"] += 1
                if delay >= left:
                    # The try's time runs out during the delay: what a slow upstream ends with.
                    ex.note(f"fault delay {delay * 1000:.0f}ms outlasts the try: timeout")
                    if left > 0:
                        await clock.sleep(left)
                    return LocalReply("timeout", "injected delay (fault) outlasted the try's time")
                ex.note(f"fault delay {delay * 1000:.0f}ms")
                await clock.sleep(delay)
        finally:
            injector.active -= 1
        if status is not None:
            count_abort()
            injected["abort"] += 1
            ex.note(f"fault abort {status}")
            return FaultReply(status, name)
        if delay is not None and ex.try_timeout is not None:
            # The delay used part of this try's time, as the upstream's slowness would have.
            per_try = ex.try_timeout
            ex.try_timeout = per_try - delay
            try:
                return await next_handler(ex)
            finally:
                ex.try_timeout = per_try
        return await next_handler(ex)

    return fault_layer


def _rng(options: FaultOptions) -> random.Random:
    return random.Random(options.seed)
