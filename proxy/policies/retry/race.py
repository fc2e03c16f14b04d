"""The hedged try: the retry layer's one try, raced by up to ``max_extra`` hedges.

:class:`HedgedTry` stands between the retry layer and the forwarder (``RetryLayer.next``) on a
route with ``hedge:``. It starts the try; when it has not answered after the hedge delay (the
route's observed percentile or a fixed duration), it starts another try of the same request to
another replica (``Exchange.for_attempt``: the views share ``tried``, so the picker avoids the
replica already in use) and the first answer that is not a failure wins. A try that fails (a
fault, or a ``retry_on`` status) while another is still running does not win: the race waits
for the other. The losers are cancelled (a request mid-flight loses its connection: the pool
closes a connection abandoned before its response head) or, if their head had arrived too,
closed. The winner's replica becomes the try's (``settle``), so logs and spans name it.

A hedge is sent only when all hold: the request could be retried (idempotent method or
Idempotency-Key, replayable body, no upgrade), the hedge budget and the retry budget both have
a token (a hedge is extra load as a retry is), and the deadline leaves more than the hedge
delay. Fender-Trace (and the span's events when tracing) says when a hedge went and which won.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, Protocol, cast

from proxy.clock import Clock
from proxy.kernel.exchange import Exchange, Handler, LocalReply, Reply
from proxy.policies.retry.budget import RetryBudget
from proxy.policies.retry.hedge import Hedger


class RetryRules(Protocol):
    """What the race takes from its retry layer (proxy.policies.retry.layer.RetryLayer)."""

    clock: Clock
    budget: RetryBudget
    methods: frozenset[str]
    max_replay: int
    _statuses: frozenset[int]


class HedgeMetrics:
    __slots__ = ("sent", "first", "hedge", "skipped")

    def __init__(self, metrics: Any, route: str, hedger: Hedger) -> None:
        self.sent = metrics.hedges_sent.labels(route)
        self.first = metrics.hedge_winners.labels(route, "first")
        self.hedge = metrics.hedge_winners.labels(route, "hedge")
        self.skipped = {
            why: metrics.hedges_skipped.labels(route, why)
            for why in ("budget", "retry_budget", "deadline", "not_idempotent", "not_replayable")
        }
        # The delay in force, read at scrape time (nothing per request).
        metrics.hedge_delay.labels(route).set_function(lambda: hedger.delay() or 0.0)


class HedgedTry:
    """``async (Exchange) -> Reply``: one try of the retry layer, with hedges when it is slow."""

    __slots__ = ("next", "hedger", "clock", "_layer", "_metrics")

    def __init__(
        self, layer: RetryRules, next_handler: Handler, hedger: Hedger, metrics: HedgeMetrics
    ) -> None:
        self.next = next_handler
        self.hedger = hedger
        self.clock = layer.clock
        self._layer = layer
        self._metrics = metrics

    def _refusal(self, first: Exchange) -> str | None:
        """Why this request may not be hedged at all, or None."""
        layer = self._layer
        if first.upgrade is not None:
            return "not_replayable"
        if first.body_stream is not None or len(first.body) > layer.max_replay:
            return "not_replayable"
        if first.method not in layer.methods and not any(
            name == b"idempotency-key" for name, _ in first.request_headers
        ):
            return "not_idempotent"
        return None

    def _skip(self, first: Exchange, why: str) -> None:
        self.hedger.skipped += 1
        self._metrics.skipped[why].inc()
        first.note(f"hedge skipped: {why.replace('_', ' ')}")

    def _fails(self, reply: Reply) -> bool:
        """A fault or a retry_on status: this answer does not win while another try runs."""
        if isinstance(reply, LocalReply):
            return True
        return reply.status in self._layer._statuses

    async def __call__(self, first: Exchange) -> Reply:
        hedger = self.hedger
        clock = self.clock
        nxt = self.next
        started = clock.now()
        hedger.budget.request(started)
        delay = hedger.delay()
        if delay is None:  # too few tries seen to know what is slow
            reply = await nxt(first)
            hedger.observe(clock.now() - started)
            return reply
        why = self._refusal(first)
        if why is not None:
            self._skip(first, why)
            return await nxt(first)
        # The race runs on callbacks, not asyncio.wait: each try is a task that pokes one future
        # when it ends, the hedge delay is a clock timer that pokes it too (measured: a timer task
        # and asyncio.wait cost twice what the try's own task does).
        loop = asyncio.get_running_loop()
        wake = loop.create_future()
        fired = False

        def poke(_task: object = None) -> None:
            if not wake.done():
                wake.set_result(None)

        def ring() -> None:
            nonlocal fired
            fired = True
            poke()

        task: asyncio.Future[Reply] = loop.create_task(cast(Coroutine[Any, Any, Reply], nxt(first)))
        task.add_done_callback(poke)
        tries: dict[asyncio.Future[Reply], tuple[Exchange, float, int]] = {task: (first, started, 1)}
        launched = 1
        timer = clock.call_later(delay, ring)  # type: ignore[attr-defined]
        fallback: Reply | None = None
        fallback_try: Exchange = first
        try:
            while tries:
                await wake
                wake = loop.create_future()
                now = clock.now()
                if fired:
                    fired = False
                    timer = None
                    why = self._budgets(first, now, delay)
                    if why is not None:
                        self._skip(first, why)
                    else:
                        launched += 1
                        attempt = first.for_attempt(first.try_timeout)
                        attempt.interim = None  # 1xx answers are relayed from the first try only
                        task = loop.create_task(cast(Coroutine[Any, Any, Reply], nxt(attempt)))
                        task.add_done_callback(poke)
                        tries[task] = (attempt, now, launched)
                        hedger.sent += 1
                        self._metrics.sent.inc()
                        first.note(f"hedge {launched - 1} sent after {(now - started) * 1000:.1f}ms")
                        if launched <= hedger.max_extra:
                            timer = clock.call_later(delay, ring)  # type: ignore[attr-defined]
                for task in [t for t in tries if t.done()]:
                    attempt, began, number = tries.pop(task)
                    reply = task.result()  # a layer's exception ends the race (finally cancels the rest)
                    hedger.observe(now - began)
                    if tries and self._fails(reply):
                        if fallback is not None:
                            fallback.close()
                        fallback, fallback_try = reply, attempt
                        continue
                    if fallback is not None:
                        fallback.close()
                        fallback = None
                    if launched > 1:
                        self._won(first, attempt, number, tries, now)
                    return reply
            # Every try failed: the last failure goes back (the retry layer may retry it).
            if fallback_try is not first:
                first.settle(fallback_try)
            assert fallback is not None
            reply, fallback = fallback, None
            return reply
        finally:
            if timer is not None:
                timer.cancel()
            if fallback is not None:
                fallback.close()
            for task in tries:
                _discard(task)

    def _budgets(self, first: Exchange, now: float, delay: float) -> str | None:
        """Why no hedge may go now (budgets, deadline), or None having taken the tokens."""
        if first.deadline - now <= delay:
            return "deadline"
        if not self.hedger.budget.try_spend():
            return "budget"
        if not self._layer.budget.try_spend():
            return "retry_budget"
        return None

    def _won(
        self,
        first: Exchange,
        winner: Exchange,
        number: int,
        losers: dict[Any, tuple[Exchange, float, int]],
        now: float,
    ) -> None:
        hedger = self.hedger
        if number == 1:
            self._metrics.first.inc()
        else:
            hedger.won += 1
            self._metrics.hedge.inc()
            first.settle(winner)
        for _attempt, began, _n in losers.values():
            hedger.observe(now - began)  # at least this long: keeps the slow tail in the estimate
        which = "first try" if number == 1 else f"hedge {number - 1}"
        first.note(f"hedge race won by {which} ({winner.replica_name or '-'})")


def _discard(task: asyncio.Future[Reply]) -> None:
    """A losing try: cancel it mid-flight, or close its answer if its head had arrived too."""
    if not task.done():
        task.cancel()
        return
    if not task.cancelled() and task.exception() is None:
        task.result().close()
