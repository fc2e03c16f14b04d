"""Retries with backoff, a retry budget, per-try timeouts and the route's deadline.

The layer sits just outside the forwarder and calls it again when a try ends
in a ``retry_on`` condition, as long as all of these hold:

* tries are left (``attempts`` counts the first one);
* the request body can be sent again (it was buffered whole; a streamed body
  is not, and the response then carries ``X-Fender-Retry: not-replayable``);
* the method is idempotent (``methods``), or the request carries an
  ``Idempotency-Key`` header, or nothing reached the upstream (a connect
  failure is always safe to retry);
* the wait (backoff, or the upstream's ``Retry-After`` when it fits) and a try
  as long as the last one both fit before the route's deadline;
* the retry budget is not spent.

Otherwise the last answer goes back as it is. Layers never write to the
client, so a retry can only ever replace an answer nobody has seen yet; the
upstream response it replaces is closed first (its connection is dropped).

The first try runs on the exchange itself; each retry gets its own view of it
(``Exchange.for_attempt``) carrying its per-try timeout and the replica it went to, and so does
each hedge (proxy.policies.retry.race). A retry goes to another replica when one is eligible: the
forwarder records each replica tried in the request's ``tried`` (shared by the views) and the
replica picker avoids them.
"""

from __future__ import annotations

from prometheus_client import Counter

from proxy.clock import Clock
from proxy.config.models import Route
from proxy.grpc import request_is_grpc
from proxy.kernel.classify import GRPC_CONDITIONS, Classifier
from proxy.kernel.exchange import BodyStreamFn, Exchange, Handler, LocalReply, Reply
from proxy.kernel.reasons import TRY_FAULTS, retry_after_of
from proxy.metrics import FastCounter, Metrics
from proxy.policies.context import LayerContext
from proxy.policies.retry.backoff import Backoff
from proxy.policies.retry.budget import RetryBudget
from proxy.policies.retry.hedge import Hedger
from proxy.policies.retry.options import STATUS_CLASSES, HedgeOptions, RetryOptions
from proxy.policies.retry.race import HedgedTry, HedgeMetrics


# Forwarder fault reasons (LocalReply.reason) that retry_on may name.
class RetryMetrics:
    __slots__ = ("_m", "route", "attempts", "retries", "skipped", "budget_exhausted", "backoff")

    def __init__(self, metrics: Metrics, route: str) -> None:
        self._m = metrics
        self.route = route
        self.attempts: dict[str, FastCounter] = {}
        self.retries: dict[str, Counter] = {}
        self.skipped = {
            r: metrics.retries_skipped.labels(route, r)
            for r in ("deadline", "not_replayable", "not_idempotent", "retry_after")
        }
        self.budget_exhausted = metrics.retry_budget_exhausted.labels(route)
        self.backoff = metrics.retry_backoff.labels(route)
        for outcome in (*STATUS_CLASSES, *TRY_FAULTS, "other"):
            self.attempts[outcome] = FastCounter(metrics.retry_attempts.labels(route, outcome))

    def retry(self, reason: str) -> Counter:
        child = self.retries.get(reason)
        if child is None:
            child = self.retries[reason] = self._m.retries.labels(self.route, reason)
        return child


class RetryLayer:
    __slots__ = (
        "next",
        "clock",
        "attempts",
        "per_try_timeout",
        "backoff",
        "budget",
        "methods",
        "max_replay",
        "honor_retry_after",
        "_statuses",
        "_reasons",
        "_metrics",
        "_by_status",
        "_classifier",
    )

    def __init__(
        self, options: RetryOptions, next_handler: Handler, clock: Clock, metrics: RetryMetrics
    ) -> None:
        self.next = next_handler
        self.clock = clock
        self.attempts = options.attempts
        self.per_try_timeout = options.per_try_timeout
        self.backoff = Backoff(options.backoff)
        self.budget = RetryBudget(options.budget, clock)
        self.methods = frozenset(options.methods)
        self.max_replay = options.max_replay_body
        self.honor_retry_after = options.honor_retry_after
        classifier = Classifier(options.retry_on)
        statuses = classifier.statuses
        self._classifier = classifier
        self._statuses = statuses
        self._reasons = classifier.reasons
        self._metrics = metrics
        # status -> (count the attempt, retry_on condition or None): one lookup per upstream answer.
        self._by_status = {
            status: (
                metrics.attempts[STATUS_CLASSES[status // 100 - 1]].inc,
                str(status) if status in statuses else None,
            )
            for status in range(100, 600)
        }

    def _condition(self, reply: Reply) -> str | None:
        """The retry_on condition this answer meets, or None (counting the attempt on the way)."""
        metrics = self._metrics
        if isinstance(reply, LocalReply):
            reason = reply.reason
            metrics.attempts.get(reason, metrics.attempts["other"]).inc()
            return reason if reason in self._reasons else None
        status = reply.status
        known = self._by_status.get(status)
        if known is not None:
            known[0]()
            if known[1] is None and self._classifier.grpc:
                return self._classifier.grpc_fails(reply.headers)
            return known[1]
        metrics.attempts[STATUS_CLASSES[min(max(status // 100, 1), 5) - 1]].inc()
        return str(status) if status in self._statuses else None

    def _skip(self, ex: Exchange, why: str) -> None:
        self._metrics.skipped[why].inc()
        ex.response_headers.append((b"x-fender-retry", why.replace("_", "-").encode()))
        ex.note(f"retry skipped: {why}")

    def _safe_to_resend(self, ex: Exchange, reply: Reply, condition: str) -> bool:
        if ex.method in self.methods:
            return True
        if condition in GRPC_CONDITIONS:
            return True  # listing a gRPC status declares such calls retryable (gRPC's retry policy)
        if isinstance(reply, LocalReply) and reply.error is not None and not reply.error.request_sent:
            return True  # nothing reached the upstream: resending is no duplicate
        return any(name == b"idempotency-key" for name, _ in ex.request_headers)

    async def __call__(self, ex: Exchange) -> Reply:
        budget = self.budget
        clock = self.clock
        started = clock.now()
        budget.request(started)
        nxt = self.next
        per_try_timeout = self.per_try_timeout
        # The first try runs on the exchange itself (nothing runs beside it: no copy on the path
        # most requests take); each retry gets its own view (Exchange.for_attempt).
        attempt = ex
        ex.try_timeout = per_try_timeout
        if self._classifier.grpc and ex.body_stream is not None and request_is_grpc(ex.request_headers):
            # A gRPC body comes without a length (HTTP/2), so it streams; a copy is kept while it stays
            # within max_replay_body, so a unary call answered UNAVAILABLE can be sent again.
            ex.body_stream = _ReplayCopy(ex.body_stream, self.max_replay)
        tried = 1
        previous_wait = self.backoff.initial
        while True:
            reply = await nxt(attempt)
            if attempt is not ex:
                ex.settle(attempt)
            condition = self._condition(reply)
            if condition is None or tried >= self.attempts:
                return reply
            if ex.upgrade is not None and not isinstance(reply, LocalReply):
                return reply  # an upgrade is retried only before the upstream answered
            if ex.body_stream is not None:
                copy = ex.body_stream
                if not isinstance(copy, _ReplayCopy) or copy.body is None:
                    self._skip(ex, "not_replayable")
                    return reply
                # The whole body is here: the next try sends it from memory.
                ex.body, ex.body_stream, ex.content_length = copy.body, None, None
            elif len(ex.body) > self.max_replay:
                self._skip(ex, "not_replayable")
                return reply
            if not self._safe_to_resend(ex, reply, condition):
                self._skip(ex, "not_idempotent")
                return reply
            now = clock.now()
            left = ex.deadline - now
            wait = self.backoff.delay(tried, previous_wait)
            if self.honor_retry_after and not isinstance(reply, LocalReply):
                asked = retry_after_of(reply.headers)
                if asked is not None:
                    if asked >= left:
                        self._skip(ex, "retry_after")
                        return reply
                    wait = max(wait, asked)
            # A retry starts only if the wait and a try as long as the last one fit before the deadline.
            if wait + max(now - started, 0.001) > left:
                self._skip(ex, "deadline")
                return reply
            if not budget.try_spend():
                self._metrics.budget_exhausted.inc()
                ex.response_headers.append((b"x-fender-retry", b"budget-exhausted"))
                ex.note("retry skipped: budget exhausted")
                return reply
            reply.close()
            self._metrics.retry(condition).inc()
            if wait > 0:
                self._metrics.backoff.inc(wait)
                await clock.sleep(wait)
            if ex.trace is not None:
                ex.note(f"retry {tried} after {condition}, backoff {wait * 1000:.1f}ms")
            previous_wait = wait
            tried += 1
            attempt = ex.for_attempt(per_try_timeout)
            started = clock.now()


class _ReplayCopy:
    """A request body stream that keeps what passed through, up to ``limit`` bytes.

    ``body`` is the whole body once the stream ended within the limit holding at most one gRPC message,
    else None (still streaming, too large, or a client stream: the call is then not replayable, as a
    streaming RPC is never retried once a message went)."""

    __slots__ = ("_stream", "_limit", "_parts", "_size", "body")

    def __init__(self, stream: BodyStreamFn, limit: int) -> None:
        self._stream = stream
        self._limit = limit
        self._parts: list[bytes] | None = []
        self._size = 0
        self.body: bytes | None = None

    @property
    def done(self) -> bool:
        return bool(getattr(self._stream, "done", True))

    @property
    def trailers(self) -> list[tuple[bytes, bytes]] | None:
        """The request's trailer fields, passed through to the upstream client."""
        return getattr(self._stream, "trailers", None)

    async def __call__(self) -> bytes:
        chunk = await self._stream()
        parts = self._parts
        if parts is not None:
            if chunk:
                self._size += len(chunk)
                if self._size > self._limit:
                    self._parts = None
                else:
                    parts.append(chunk)
            else:
                body = b"".join(parts)
                self._parts = None
                if _one_message(body) and not self.trailers:
                    self.body = body  # (with trailers it is not replayed: a retry would send it without)
        return chunk


def _one_message(body: bytes) -> bool:
    """The body is at most one gRPC message: a unary call (more is a client stream, never replayed)."""
    return not body or (len(body) >= 5 and int.from_bytes(body[1:5], "big") == len(body) - 5)


def build_layer(route: Route, next_handler: Handler, ctx: LayerContext) -> RetryLayer | None:
    options: RetryOptions | None = getattr(route, "retry", None)
    hedge: HedgeOptions | None = getattr(route, "hedge", None)
    if hedge is not None and options is None:
        options = RetryOptions(attempts=1)  # hedges without retries: the default budget and methods
    if options is None or (options.attempts <= 1 and hedge is None):
        return None
    layer = RetryLayer(options, next_handler, ctx.clock, RetryMetrics(ctx.metrics, route.name))
    budget = options.budget
    if budget.scope == "upstream":
        # One budget per upstream (the same key within a build gives the same object), kept by a
        # reload with equal settings; the policy checks that its routes agree on them.
        layer.budget = ctx.keep(
            ("retry-budget", route.upstream), budget, lambda: RetryBudget(budget, ctx.clock)
        )
        ctx.expose("retry_budget", route.upstream, layer.budget)
    if hedge is not None:
        _hedge(layer, route, hedge, ctx)
    return layer


def _hedge(layer: RetryLayer, route: Route, options: HedgeOptions, ctx: LayerContext) -> None:
    """Put a HedgedTry between the retry layer and its next handler (the forwarder's side)."""
    # Kept across reloads with equal settings: the latency estimate is what the route learnt.
    hedger = ctx.keep(("hedge", route.name), options, lambda: Hedger(route.name, options, ctx.clock))
    ctx.expose("hedge", route.name, hedger)
    layer.next = HedgedTry(layer, layer.next, hedger, HedgeMetrics(ctx.metrics, route.name, hedger)).__call__
