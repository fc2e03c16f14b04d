"""Spans for one request and its tries, as two pipeline layers built only when tracing is on.

``ServerSpanLayer`` wraps a route's whole pipeline: it continues the client's
trace (or starts one, sampled at ``tracing.sample``), and once the pipeline has
a reply it encodes the server span from what the layers decided. ``ClientSpanLayer``
wraps the forwarder: one client span per try, and the ``traceparent`` the
upstream receives names that try's span as its parent. A route of a policy
without ``tracing:`` gets neither layer, so it pays nothing.

Costs (callgrind, per request of a pass-through route; tests/bench/tracing.py --instructions):
an unsampled request pays for one header scan, one sampling draw and one
``traceparent`` (two random ints formatted as hex, the cheapest of the ways
measured), and calls the forwarder directly when no layer sits between the two
span layers. A sampled request's spans are encoded as they end (proxy/tracing/spans.py),
their constant attributes pre-encoded.
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
from proxy.tracing.spans import (
    CLIENT,
    SERVER,
    Attributes,
    DoubleAttribute,
    StringAttribute,
    attribute,
    event_attribute,
    name_and_kind,
    span,
    utf8,
)

_BULKHEAD_REASONS = ("bulkhead_full", "bulkhead_timeout")
_EXEMPLAR_EVERY = 1_000_000_000  # ns: at most one new exemplar per histogram bucket per second

# Attributes whose values come from small sets: each distinct value encoded once (bounded caches).
_METHOD = Attributes("http.request.method")
_STATUS = Attributes("http.response.status_code")
_TRIES = Attributes("fender.tries")
_LOCAL_REASON = Attributes("fender.local_reason")
_ERROR_TYPE = Attributes("error.type")
_CACHE_STATUS = Attributes("fender.cache_status")
_BULKHEAD = Attributes("fender.bulkhead")
_ATTEMPT = Attributes("fender.attempt")
_RESEND = Attributes("http.request.resend_count")
_FAULT = Attributes("fender.fault")
_RATE_LIMITED = attribute("fender.rate_limit", "limited")
_RATE_ALLOWED = attribute("fender.rate_limit", "allowed")
# Attributes with a value per request.
_URL_PATH = StringAttribute("url.path")
_URL_QUERY = StringAttribute("url.query")
_SERVER_ADDRESS = StringAttribute("server.address")
_CLIENT_ADDRESS = StringAttribute("client.address")
_REQUEST_ID = StringAttribute("fender.request_id")
_BACKOFF = DoubleAttribute("fender.backoff_ms")


class _Names:
    """A span's encoded name and kind per request method (bounded: methods are client input)."""

    __slots__ = ("_format", "_kind", "_cache")

    def __init__(self, name_format: str, kind: int) -> None:
        self._format = name_format
        self._kind = kind
        self._cache: dict[str, bytes] = {}

    def __call__(self, method: str) -> bytes:
        encoded = self._cache.get(method)
        if encoded is None:
            encoded = name_and_kind(self._format.format(method), self._kind)
            if len(self._cache) < 64:
                self._cache[method] = encoded
        return encoded


_CLIENT_NAMES = _Names("{}", CLIENT)


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
        self.draw = (sampler or random.Random(options.sample_seed)).random
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
        return self.draw() < self.rate

    def start(self) -> None:
        self.exporter.start()

    async def close(self) -> None:
        await self.exporter.close()


class RequestTrace:
    """What the layers of a sampled request share: its trace, its server span and the tries so far.

    (An unsampled request's ``ex.tracing`` is just the traceparent bytes it forwards.)
    """

    __slots__ = ("trace_id", "span_id", "parent_id", "start_ns", "headers", "tries", "last_end", "prefix")

    def __init__(self, trace_id: bytes, span_id: bytes, parent_id: bytes, headers, start_ns: int) -> None:
        self.trace_id = trace_id
        self.span_id = span_id  # the server span's
        self.parent_id = parent_id  # the client's span (b"" for a new trace)
        self.start_ns = start_ns
        self.headers = headers  # the forwarded headers without the client's traceparent
        self.tries = 0
        self.last_end = 0  # when the previous try ended (ns), for the backoff before the next
        self.prefix = b"00-" + trace_id.hex().encode() + b"-"  # of each try's traceparent


class ServerSpanLayer:
    __slots__ = (
        "next",
        "unsampled_next",
        "tracer",
        "draw",
        "rate",
        "bits",
        "upstream",
        "names",
        "constant",
        "breaker_event",
        "histogram",
        "exemplar_at",
        "has_rate_limit",
        "has_bulkhead",
    )

    def __init__(self, next_handler, tracer: Tracer, route, metrics) -> None:
        self.next = next_handler
        # With no layer between the two span layers (a pass-through route), an unsampled request
        # skips the client span layer's frame: it would only hand the request on.
        below = getattr(next_handler, "__self__", None)
        self.unsampled_next = below.next if isinstance(below, ClientSpanLayer) else next_handler
        self.tracer = tracer
        self.draw = tracer.draw
        self.rate = tracer.rate
        self.bits = tracer.bits
        self.upstream = route.upstream
        self.names = _Names("{} " + route.name, SERVER)
        self.constant = attribute("fender.route", route.name) + attribute("fender.upstream", route.upstream)
        self.breaker_event = event_attribute("fender.upstream", route.upstream)
        self.histogram = metrics.request_duration.labels(route.name)
        self.exemplar_at = [0] * len(self.histogram._buckets)  # when each bucket last got one (ns)
        self.has_rate_limit = bool(getattr(route, "rate_limit", None))
        self.has_bulkhead = getattr(route, "bulkhead", None) is not None

    def __call__(self, ex: Exchange):
        """The pipeline's reply (an awaitable): an unsampled request only gets its traceparent.

        A plain function returning the next layer's coroutine, not a coroutine of its own: the
        unsampled majority then pays no extra frame (measured with callgrind, tests/bench/tracing.py).
        """
        for name, _ in ex.request_headers:
            if name == b"traceparent":
                return self._with_parent(ex)
        if self.draw() < self.rate:
            return self._sampled(ex, self.tracer.new_trace_id(), b"", False)
        # Not sampled: one span id (never recorded) is the upstream's parent for every try.
        bits = self.bits
        traceparent = b"00-%032x-%016x-00" % (bits(128) or 1, bits(64) or 1)
        ex.headers.append((b"traceparent", traceparent))
        ex.tracing = traceparent
        if ex.trace is not None:
            ex.note("trace " + traceparent[3:35].decode())
        return self.unsampled_next(ex)

    def _with_parent(self, ex: Exchange):
        """A request that came with a traceparent: continue its trace, following its sampled flag."""
        parent = incoming_context(ex.request_headers)
        bits = self.bits
        if parent is None:  # invalid (or two of them): a new trace, as if there were none
            if self.draw() < self.rate:
                return self._sampled(ex, self.tracer.new_trace_id(), b"", True)
            trace_hex = b"%032x" % (bits(128) or 1)
        elif parent[2]:
            return self._sampled(ex, parent[0], parent[1], True)
        else:
            trace_hex = parent[0].hex().encode()
        traceparent = b"00-%s-%016x-00" % (trace_hex, bits(64) or 1)
        ex.headers = [h for h in ex.headers if h[0] != b"traceparent"]
        ex.headers.append((b"traceparent", traceparent))
        ex.tracing = traceparent
        if ex.trace is not None:
            ex.note("trace " + traceparent[3:35].decode())
        return self.unsampled_next(ex)

    async def _sampled(self, ex: Exchange, trace_id: bytes, parent_id: bytes, present: bool) -> Reply:
        headers = [h for h in ex.headers if h[0] != b"traceparent"] if present else ex.headers
        state = ex.tracing = RequestTrace(
            trace_id, self.tracer.new_span_id(), parent_id, headers, time.time_ns()
        )
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
            self._finish(state, ex, 499, None, notes, type(error).__name__)
            raise
        finally:
            if notes is not None:
                ex.trace = None
        self._finish(state, ex, reply.status, reply, notes, None)
        return reply

    def _finish(
        self, state: RequestTrace, ex: Exchange, status: int, reply, notes: list[str] | None, error
    ) -> None:
        end = time.time_ns()
        path, _, query = ex.target.partition(b"?")
        parts = [_METHOD(ex.method), _URL_PATH(utf8(path))]
        if query:
            parts.append(_URL_QUERY(utf8(query)))
        if ex.host is not None:
            parts.append(_SERVER_ADDRESS(utf8(ex.host)))
        if ex.client:
            parts.append(_CLIENT_ADDRESS(ex.client.encode()))
        parts.append(_STATUS(status))
        parts.append(self.constant)
        parts.append(_REQUEST_ID(utf8(ex.request_id)))
        parts.append(_TRIES(len(ex.tried)))
        # The notes carry no time of their own: each event is stamped with the span's end.
        events = [(end, utf8(note), b"") for note in notes] if notes else None
        reason = reply.reason if isinstance(reply, LocalReply) else None
        if reason is not None:
            parts.append(_LOCAL_REASON(reason))
            parts.append(_ERROR_TYPE(reason))
            if reason == "breaker_open":
                (events if events is not None else (events := [])).append(
                    (end, b"breaker_open", self.breaker_event)
                )
        if ex.response_headers:
            cache = cache_result(ex.response_headers)
            if cache is not None:
                parts.append(_CACHE_STATUS(cache))
        if self.has_rate_limit:
            parts.append(_RATE_LIMITED if reason == "rate_limited" else _RATE_ALLOWED)
        if self.has_bulkhead and state.tries or reason in _BULKHEAD_REASONS:
            parts.append(_BULKHEAD(reason if reason in _BULKHEAD_REASONS else "admitted"))
        if error is None and status >= 500:
            error = reason or f"HTTP {status}"
        trace_id = state.trace_id
        tracestate = b""
        if state.parent_id:
            for name, value in ex.request_headers:
                if name == b"tracestate":
                    tracestate = utf8(value.strip()[:512])
                    break
        self.tracer.exporter.add(
            span(
                trace_id,
                state.span_id,
                state.parent_id,
                tracestate,
                self.names(ex.method),
                state.start_ns,
                end,
                b"".join(parts),
                events,
                None if error is None else error.encode(),
            )
        )
        # The exemplar: this trace, on the request-duration bucket its duration falls in, at most
        # one a second per bucket (a scrape shows only each bucket's last one).
        seconds = time.perf_counter() - ex.started
        child = self.histogram
        index = bisect_left(child._upper_bounds, seconds)  # the bucket observe() counts it in (+Inf last)
        if index < len(child._buckets) and end - self.exemplar_at[index] >= _EXEMPLAR_EVERY:
            self.exemplar_at[index] = end
            child._buckets[index].set_exemplar(Exemplar({"trace_id": trace_id.hex()}, seconds, end / 1e9))


class ClientSpanLayer:
    """Around the forwarder: the traceparent for this try, and its client span when sampled."""

    __slots__ = ("next", "tracer", "upstream", "_peers", "_runtime")

    def __init__(self, next_handler, tracer: Tracer, upstream) -> None:
        self.next = next_handler
        self.tracer = tracer
        self.upstream = attribute("fender.upstream", upstream.name)
        self._runtime = upstream
        # The encoded attributes naming each replica, made once (the names come from the policy;
        # those DNS adds later are made when first traced, see _peer).
        self._peers = {r.name: _peer_attributes(r) for r in upstream.replicas}

    def _peer(self, name: str | None) -> bytes:
        """A replica DNS added after this layer was built: its attributes, made on first use."""
        replicas = self._runtime.replicas
        for replica in replicas:
            if replica.name == name:
                if len(self._peers) > 2 * len(replicas) + 16:  # addresses come and go: stay bounded
                    self._peers = {r.name: _peer_attributes(r) for r in replicas}
                peer = self._peers[replica.name] = _peer_attributes(replica)
                return peer
        return b""  # no replica took it

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
        start = time.time_ns()
        attempt = state.tries
        backoff = (start - state.last_end) / 1e6 if attempt > 1 and state.last_end else 0.0
        reply = await self.next(ex)
        end = state.last_end = time.time_ns()
        peer = self._peers.get(ex.replica_name)
        status = reply.status
        parts = [
            _METHOD(ex.method),
            self.upstream,
            self._peer(ex.replica_name) if peer is None else peer,
            _ATTEMPT(attempt),
            _BACKOFF(round(backoff, 3)),
            _STATUS(status),
        ]
        if attempt > 1:
            parts.append(_RESEND(attempt - 1))
        error = None
        if isinstance(reply, LocalReply):
            parts.append(_ERROR_TYPE(reply.reason))
            parts.append(_FAULT(reply.reason))
            error = reply.reason.encode()
        elif status >= 500:
            error = b"HTTP %d" % status
        self.tracer.exporter.add(
            span(
                state.trace_id,
                span_id,
                state.span_id,
                b"",
                _CLIENT_NAMES(ex.method),
                start,
                end,
                b"".join(parts),
                None,
                error,
            )
        )
        return reply


def _peer_attributes(replica) -> bytes:
    if replica.unix_path is not None:
        return (
            attribute("fender.replica", replica.name)
            + attribute("network.transport", "unix")
            + attribute("network.peer.address", replica.unix_path)
        )
    return (
        attribute("fender.replica", replica.name)
        + attribute("server.address", replica.host)
        + attribute("server.port", replica.port)
    )
