"""Spans for one request and its tries, as two pipeline layers built only when tracing is on.

``ServerSpanLayer`` wraps a route's whole pipeline: it continues the client's
trace (or starts one, sampled at ``tracing.sample``), and once the pipeline has
a reply it fills the server span from what the layers decided. ``ClientSpanLayer``
wraps the forwarder: one client span per try, and the ``traceparent`` the
upstream receives names that try's span as its parent. A route of a policy
without ``tracing:`` gets neither layer, so it pays nothing.
"""

from __future__ import annotations

import os
import random
import time
from bisect import bisect_left

from prometheus_client.samples import Exemplar

from proxy.clock import SYSTEM_CLOCK, Clock
from proxy.kernel.exchange import Exchange, LocalReply, Reply
from proxy.policies.cache.status import cache_result
from proxy.tracing.context import incoming_context
from proxy.tracing.export import SpanExporter
from proxy.tracing.options import TracingOptions, resolve_headers
from proxy.tracing.spans import CLIENT, SERVER, Span

_BULKHEAD_REASONS = ("bulkhead_full", "bulkhead_timeout")


class Tracer:
    """Sampling, ids and the exporter of one policy's tracing section (kept across reloads if unchanged)."""

    def __init__(
        self,
        options: TracingOptions,
        metrics,
        clock: Clock = SYSTEM_CLOCK,
        sampler: random.Random | None = None,
    ):
        self.options = options
        self.rate = options.sample
        # The sampling draws and the ids come from separate sources, so a seeded sampler
        # gives the same decisions whatever else asks for random numbers.
        self._draw = (sampler or random.Random(options.sample_seed)).random
        # Ids need to be unique, not secret (as in the OpenTelemetry SDK): a Mersenne Twister seeded
        # from the OS, where SystemRandom would cost a system call per id.
        self.bits = random.Random(os.urandom(32)).getrandbits
        self.metrics = metrics
        self.exporter = SpanExporter(
            options.traces_url,
            resolve_headers(options.headers),
            options.service_name,
            options.queue_size,
            metrics,
            clock,
        )

    def new_trace_id(self) -> bytes:
        return (self.bits(128) or 1).to_bytes(16, "big")

    def new_span_id(self) -> bytes:
        return (self.bits(64) or 1).to_bytes(8, "big")

    def sample_root(self) -> bool:
        return self._draw() < self.rate

    def start(self) -> None:
        self.exporter.start()

    async def close(self) -> None:
        await self.exporter.close()


class RequestTrace:
    """What the layers of a sampled request share: its trace, its server span and the tries so far.

    (An unsampled request's ``ex.tracing`` is just the traceparent bytes it forwards.)
    """

    __slots__ = ("trace_id", "span", "headers", "tries", "last_end", "prefix")

    def __init__(self, trace_id: bytes, span: Span, headers) -> None:
        self.trace_id = trace_id
        self.span = span
        self.headers = headers  # the forwarded headers without the client's traceparent
        self.tries = 0
        self.last_end = 0  # when the previous try ended (ns), for the backoff before the next
        self.prefix = b"00-" + trace_id.hex().encode() + b"-"  # of each try's traceparent


class ServerSpanLayer:
    __slots__ = ("next", "tracer", "route", "upstream", "histogram", "has_rate_limit", "has_bulkhead")

    def __init__(self, next_handler, tracer: Tracer, route, metrics) -> None:
        self.next = next_handler
        self.tracer = tracer
        self.route = route.name
        self.upstream = route.upstream
        self.histogram = metrics.request_duration.labels(route.name)
        self.has_rate_limit = bool(getattr(route, "rate_limit", None))
        self.has_bulkhead = getattr(route, "bulkhead", None) is not None

    def __call__(self, ex: Exchange):
        """The pipeline's reply (an awaitable): an unsampled request only gets its traceparent.

        A plain function returning the next layer's coroutine, not a coroutine of its own: the
        unsampled majority then pays no extra frame (measured with callgrind, tests/bench/tracing.py).
        """
        tracer = self.tracer
        parent = None
        present = False
        for name, _ in ex.request_headers:
            if name == b"traceparent":
                present = True
                parent = incoming_context(ex.request_headers)
                break
        if parent is None:
            if tracer.sample_root():
                return self._sampled(ex, tracer.new_trace_id(), b"", present)
            traceparent = b"00-%032x-%016x-00" % (tracer.bits(128) or 1, tracer.bits(64) or 1)
        elif parent[2]:
            return self._sampled(ex, parent[0], parent[1], present)
        else:
            traceparent = b"00-%s-%016x-00" % (parent[0].hex().encode(), tracer.bits(64) or 1)
        # Not sampled: one span id (never recorded) is the upstream's parent for every try.
        if present:
            ex.headers = [h for h in ex.headers if h[0] != b"traceparent"]
        ex.headers.append((b"traceparent", traceparent))
        ex.tracing = traceparent
        if ex.trace is not None:
            ex.note("trace " + traceparent[3:35].decode())
        return self.next(ex)

    async def _sampled(self, ex: Exchange, trace_id: bytes, parent_id: bytes, present: bool) -> Reply:
        tracer = self.tracer
        span = Span(
            trace_id, tracer.new_span_id(), parent_id, f"{ex.method} {self.route}", SERVER, time.time_ns()
        )
        if parent_id:
            for name, value in ex.request_headers:
                if name == b"tracestate":
                    span.trace_state = value.decode("latin-1")[:512]
                    break
        headers = [h for h in ex.headers if h[0] != b"traceparent"] if present else ex.headers
        ex.tracing = RequestTrace(trace_id, span, headers)
        notes = None
        if ex.trace is not None:
            ex.note(f"trace {trace_id.hex()}")
        else:
            # A sampled request records the layers' decisions (ex.note: breaker state, bulkhead
            # queueing, retries, limits) as span events; no Fender-Trace goes to the client for it.
            notes = ex.trace = []
        try:
            reply = await self.next(ex)
        except BaseException as error:
            span.error = type(error).__name__
            self._finish(span, ex, 499, None, notes)
            raise
        finally:
            if notes is not None:
                ex.trace = None
        self._finish(span, ex, reply.status, reply, notes)
        return reply

    def _finish(self, span: Span, ex: Exchange, status: int, reply, notes: list[str] | None) -> None:
        span.end_ns = end = time.time_ns()
        if notes:
            # The notes carry no time of their own: each event is stamped with the span's end.
            span.events.extend((end, note, {}) for note in notes)
        a = span.attributes
        a["http.request.method"] = ex.method
        target = ex.target.decode("latin-1")
        path, _, query = target.partition("?")
        a["url.path"] = path
        if query:
            a["url.query"] = query
        if ex.host is not None:
            a["server.address"] = ex.host.decode("latin-1")
        if ex.client:
            a["client.address"] = ex.client
        a["http.response.status_code"] = status
        a["fender.route"] = self.route
        a["fender.upstream"] = self.upstream
        a["fender.request_id"] = ex.request_id.decode("latin-1")
        a["fender.tries"] = len(ex.tried)
        reason = reply.reason if isinstance(reply, LocalReply) else None
        if reason is not None:
            a["fender.local_reason"] = reason
            a["error.type"] = reason
        cache = cache_result(ex.response_headers) if ex.response_headers else None
        if cache is not None:
            a["fender.cache_status"] = cache
        if self.has_rate_limit:
            a["fender.rate_limit"] = "limited" if reason == "rate_limited" else "allowed"
        if self.has_bulkhead and ex.tracing.tries or reason in _BULKHEAD_REASONS:
            a["fender.bulkhead"] = reason if reason in _BULKHEAD_REASONS else "admitted"
        if reason == "breaker_open":
            span.events.append((end, "breaker_open", {"fender.upstream": self.upstream}))
        if status >= 500:
            span.error = reason or f"HTTP {status}"
        self.tracer.exporter.add(span)
        # The exemplar: this trace, on the request-duration bucket its duration falls in.
        seconds = time.perf_counter() - ex.started
        child = self.histogram
        index = bisect_left(child._upper_bounds, seconds)  # the bucket observe() counts it in (+Inf last)
        if index < len(child._buckets):
            child._buckets[index].set_exemplar(
                Exemplar({"trace_id": span.trace_id.hex()}, seconds, end / 1e9)
            )


class ClientSpanLayer:
    """Around the forwarder: the traceparent for this try, and its client span when sampled."""

    __slots__ = ("next", "tracer", "upstream", "_peers", "_runtime")

    def __init__(self, next_handler, tracer: Tracer, upstream) -> None:
        self.next = next_handler
        self.tracer = tracer
        self.upstream = upstream.name
        self._runtime = upstream
        # The attributes naming each replica, made once (the names come from the policy; those DNS
        # adds later are made when first traced, see _peer).
        self._peers = {r.name: _peer_attributes(r) for r in upstream.replicas}

    def _peer(self, name: str | None) -> dict | None:
        """A replica DNS added after this layer was built: its attributes, made on first use."""
        replicas = self._runtime.replicas
        for replica in replicas:
            if replica.name == name:
                if len(self._peers) > 2 * len(replicas) + 16:  # addresses come and go: stay bounded
                    self._peers = {r.name: _peer_attributes(r) for r in replicas}
                peer = self._peers[replica.name] = _peer_attributes(replica)
                return peer
        return None

    def __call__(self, ex: Exchange):
        state = ex.tracing
        if state.__class__ is not RequestTrace:
            # Not sampled: the server layer already put the request's traceparent in ex.headers
            # (or no server layer ran: a cache's background refresh). The forwarder's coroutine as is.
            return self.next(ex)
        return self._traced(ex, state)

    async def _traced(self, ex: Exchange, state: RequestTrace) -> Reply:
        span_id = self.tracer.new_span_id()
        state.tries += 1
        # Set, then the forwarder copies ex.headers before its first await: concurrent tries
        # each send their own traceparent.
        ex.headers = state.headers + [(b"traceparent", state.prefix + span_id.hex().encode() + b"-01")]
        server = state.span
        start = time.time_ns()
        span = Span(state.trace_id, span_id, server.span_id, ex.method, CLIENT, start)
        attempt = state.tries
        backoff = (start - state.last_end) / 1e6 if attempt > 1 and state.last_end else 0.0
        reply = await self.next(ex)
        span.end_ns = state.last_end = time.time_ns()
        a = span.attributes = {"http.request.method": ex.method, "fender.upstream": self.upstream}
        peer = self._peers.get(ex.replica_name) or self._peer(ex.replica_name)  # None: no replica took it
        if peer is not None:
            a.update(peer)
        a["fender.attempt"] = attempt
        if attempt > 1:
            a["http.request.resend_count"] = attempt - 1
        a["fender.backoff_ms"] = round(backoff, 3)
        a["http.response.status_code"] = reply.status
        if isinstance(reply, LocalReply):
            a["error.type"] = a["fender.fault"] = reply.reason
            span.error = reply.reason
        elif reply.status >= 500:
            span.error = f"HTTP {reply.status}"
        self.tracer.exporter.add(span)
        return reply


def _peer_attributes(replica) -> dict:
    if replica.unix_path is not None:
        return {
            "fender.replica": replica.name,
            "network.transport": "unix",
            "network.peer.address": replica.unix_path,
        }
    return {"fender.replica": replica.name, "server.address": replica.host, "server.port": replica.port}
