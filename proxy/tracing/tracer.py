"""Spans for one request and its tries, as two pipeline layers built only when tracing is on.

``ServerSpanLayer`` wraps a route's whole pipeline: it continues the client's
trace (or starts one, sampled at ``tracing.sample``), and once the pipeline has
a reply it encodes the server span from what the layers decided. ``ClientSpanLayer``
wraps the forwarder: one client span per try, and the ``traceparent`` the
upstream receives names that try's span as its parent. A route of a policy
without ``tracing:`` gets neither layer, so it pays nothing.

Costs (callgrind, per request of a pass-through route; tests/bench/tracing.py --instructions):
an unsampled new trace pays for one header scan and one ``traceparent`` taken
from a block made ahead (no draw of its own: sampled places are drawn as gaps),
and calls the forwarder directly when no layer sits between the two span layers. A sampled request's spans are encoded as they end (proxy/tracing/spans.py),
their constant attributes pre-encoded.
"""

from __future__ import annotations

import math
import os
import random
import struct
import time
from binascii import hexlify
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
    attribute,
    cached,
    double_head,
    error_status,
    event_attribute,
    events,
    key_field,
    name_and_kind,
    pack_double,
    span,
    span_head,
    string_attribute,
    utf8,
)

_BULKHEAD_REASONS = ("bulkhead_full", "bulkhead_timeout")
_EXEMPLAR_EVERY = 1_000_000_000  # ns: at most one new exemplar per histogram bucket per second
_LIMIT = 512  # entries in each cache of encoded attributes (values beyond it are encoded each time)

# Encoded attributes by value, for values that repeat: paths, hosts, client addresses (bounded caches).
_PATHS: dict = {}
_HOSTS: dict = {}
_CLIENTS: dict = {}
_REQUEST_ID = key_field("fender.request_id")
_URL_QUERY = key_field("url.query")
_BACKOFF = double_head("fender.backoff_ms")
_CLIENT_NAMES: dict = {}  # client span name and kind by method

# Traceparents of unsampled new traces, made a block at a time: formatting two random ints as hex
# per request cost ~4.9k instructions; a block of 256 formatted with `%` ~1.6k each; as below ~0.73k
# (callgrind, per traceparent). Each trace id is fresh; the block's traceparents share one parent
# span id: W3C and OpenTelemetry ask a span id to be unique within its trace, and no two of these
# are in one trace (nobody records an unsampled parent's span anyway).
_BLOCK = 256
_SPLIT_HEADERS = struct.Struct("55s" * _BLOCK).unpack
_ZERO_ID = b"\0" * 8  # conservative: any 8 zero bytes in a row in the random bytes draws again


def _traceparents() -> tuple[bytes, ...]:
    """A block of unsampled traceparents with fresh random trace ids (none all zero)."""
    while True:  # bounded in practice: a retry happens with probability ~2^-51 per block
        raw = os.urandom(16 * _BLOCK + 8)
        if _ZERO_ID not in raw:
            break
    span = b"-" + hexlify(raw[-8:]) + b"-00"
    # hexlify puts "|" between the trace ids; each becomes the end of one header and the start of the next.
    ids = hexlify(raw[:-8], "|", 16).replace(b"|", span + b"00-")
    return _SPLIT_HEADERS(b"00-" + ids + span)


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
        # What each new trace (a request without a valid traceparent) gets, taken from the end and
        # refilled a block at a time: an unsampled traceparent, or None where the trace is sampled.
        # The sampled places are drawn as geometric gaps (the number of unsampled traces before the
        # next sampled one): the same odds as a draw per request, for a draw per sampled one.
        self.traceparents: list[bytes | None] = []
        self._log_unsampled = math.log1p(-self.rate) if 0 < self.rate < 1 else 0.0
        self._until = self.gap()  # unsampled new traces before the next sampled one
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

    def gap(self) -> int:
        """How many new traces go unsampled before the next sampled one (geometric, seeded draws)."""
        if self.rate <= 0:
            return 1 << 62
        if self.rate >= 1:
            return 0
        return int(math.log(1.0 - self.draw()) / self._log_unsampled)

    def next_new_trace(self) -> bytes | None:
        """What the next new trace gets: an unsampled traceparent, or None when it is sampled.

        (The layer takes from ``traceparents`` itself, without this call's frame.)
        """
        if not self.traceparents:
            self.refill()
        return self.traceparents.pop()

    def refill(self) -> None:
        if self.rate >= 1:
            self.traceparents.extend([None] * _BLOCK)
            return
        block: list[bytes | None] = list(_traceparents())
        at = self._until
        while at < _BLOCK:  # bounded: each pass moves at least one place on
            block[at] = None
            at += 1 + self.gap()
        self._until = at - _BLOCK
        block.reverse()  # taken from the end: in order
        self.traceparents.extend(block)

    def start(self) -> None:
        self.exporter.start()

    async def close(self) -> None:
        await self.exporter.close()


class RequestTrace:
    """What the layers of a sampled request share: its trace, its server span and the tries so far.

    (An unsampled request's ``ex.tracing`` is just the traceparent bytes it forwards.)
    """

    __slots__ = (
        "trace_id",
        "span_id",
        "parent_id",
        "start_ns",
        "headers",
        "tries",
        "last_end",
        "prefix",
        "client_head",
    )

    def __init__(self, trace_id: bytes, span_id: bytes, parent_id: bytes, headers, start_ns: int) -> None:
        self.trace_id = trace_id
        self.span_id = span_id  # the server span's
        self.parent_id = parent_id  # the client's span (b"" for a new trace)
        self.start_ns = start_ns
        self.headers = headers  # the forwarded headers without the client's traceparent
        self.tries = 0
        self.last_end = 0  # when the previous try ended (ns), for the backoff before the next
        self.prefix = b"00-" + trace_id.hex().encode() + b"-"  # of each try's traceparent
        self.client_head = span_head(trace_id, span_id)  # each try's span: this trace, below the server span


class ServerSpanLayer:
    __slots__ = (
        "next",
        "unsampled_next",
        "tracer",
        "bits",
        "take",
        "route",
        "upstream",
        "names",
        "common",
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
        self.bits = tracer.bits
        self.take = tracer.traceparents.pop
        self.route = route.name
        self.upstream = route.upstream
        self.names: dict[str, bytes] = {}  # the span's encoded name and kind by method
        # The attributes that follow from the method, status, tries and local reason, encoded once each.
        self.common: dict[tuple, bytes] = {}
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
        try:
            traceparent = self.take()
        except IndexError:
            self.tracer.refill()
            traceparent = self.take()
        if traceparent is None:
            return self._sampled(ex, self.tracer.new_trace_id(), b"", False)
        # Not sampled: one span id (never recorded) is the upstream's parent for every try.
        ex.headers.append((b"traceparent", traceparent))
        ex.tracing = traceparent
        if ex.trace is not None:
            ex.note("trace " + traceparent[3:35].decode())
        return self.unsampled_next(ex)

    def _with_parent(self, ex: Exchange):
        """A request that came with a traceparent: continue its trace, following its sampled flag."""
        parent = incoming_context(ex.request_headers)
        if parent is None:  # invalid (or two of them): a new trace, as if none had come
            try:
                traceparent = self.take()
            except IndexError:
                self.tracer.refill()
                traceparent = self.take()
            if traceparent is None:
                return self._sampled(ex, self.tracer.new_trace_id(), b"", True)
        elif parent[2]:
            return self._sampled(ex, parent[0], parent[1], True)
        else:  # an unsampled parent: its trace, a span id of Fender's (never recorded)
            traceparent = b"00-%s-%016x-00" % (parent[0].hex().encode(), self.bits(64) or 1)
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
        elif self.unsampled_next is self.next:
            # A sampled request records the layers' decisions (ex.note: breaker state, bulkhead
            # queueing, retries, limits) as span events; no Fender-Trace goes to the client for it.
            # (A route without policy layers has none: its only note, the try's, is the client span.)
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
        reason = reply.reason if isinstance(reply, LocalReply) else None
        key = (ex.method, status, len(ex.tried), reason, state.tries > 0)
        common = self.common.get(key) or self._common(key)
        path, _, query = ex.target.partition(b"?")
        parts = [common, _PATHS.get(path) or cached(_PATHS, _LIMIT, "url.path", path)]
        if query:
            parts.append(string_attribute(_URL_QUERY, utf8(query)))
        host = ex.host
        if host is not None:
            parts.append(_HOSTS.get(host) or cached(_HOSTS, _LIMIT, "server.address", host))
        client = ex.client
        if client:
            parts.append(_CLIENTS.get(client) or cached(_CLIENTS, _LIMIT, "client.address", client))
        parts.append(string_attribute(_REQUEST_ID, ex.request_id))  # visible ASCII (headers.py)
        if ex.response_headers:
            cache = cache_result(ex.response_headers)
            if cache is not None:
                parts.append(attribute("fender.cache_status", cache))
        extra = b""
        if notes or reason == "breaker_open":
            # The notes carry no time of their own: each event is stamped with the span's end.
            items = [(end, utf8(note), b"") for note in notes] if notes else []
            if reason == "breaker_open":
                items.append((end, b"breaker_open", self.breaker_event))
            extra = events(items)
        if error is None and status >= 500:
            error = reason or f"HTTP {status}"
        if error is not None:
            extra += error_status(utf8(error))
        trace_id = state.trace_id
        tracestate = b""
        if state.parent_id:
            for name, value in ex.request_headers:
                if name == b"tracestate":
                    tracestate = utf8(value.strip()[:512])
                    break
        self.tracer.exporter.add(
            span(
                span_head(trace_id, state.parent_id, tracestate),
                state.span_id,
                self.names.get(ex.method) or self._name(ex.method),
                state.start_ns,
                end,
                b"".join(parts),
                extra,
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

    def _common(self, key: tuple) -> bytes:
        method, status, tried, reason, forwarded = key
        parts = [
            attribute("http.request.method", method),
            attribute("http.response.status_code", status),
            attribute("fender.route", self.route),
            attribute("fender.upstream", self.upstream),
            attribute("fender.tries", tried),
        ]
        if reason is not None:
            parts.append(attribute("fender.local_reason", reason))
            parts.append(attribute("error.type", reason))
        if self.has_rate_limit:
            parts.append(attribute("fender.rate_limit", "limited" if reason == "rate_limited" else "allowed"))
        if self.has_bulkhead and forwarded or reason in _BULKHEAD_REASONS:
            parts.append(attribute("fender.bulkhead", reason if reason in _BULKHEAD_REASONS else "admitted"))
        encoded = b"".join(parts)
        if len(self.common) < _LIMIT:
            self.common[key] = encoded
        return encoded

    def _name(self, method: str) -> bytes:
        encoded = name_and_kind(f"{method} {self.route}", SERVER)
        if len(self.names) < 64:  # methods are the client's: stay bounded
            self.names[method] = encoded
        return encoded


class ClientSpanLayer:
    """Around the forwarder: the traceparent for this try, and its client span when sampled."""

    __slots__ = ("next", "tracer", "upstream", "common", "_peers", "_runtime")

    def __init__(self, next_handler, tracer: Tracer, upstream) -> None:
        self.next = next_handler
        self.tracer = tracer
        self.upstream = attribute("fender.upstream", upstream.name)
        self._runtime = upstream
        # The encoded attributes naming each replica, made once (the names come from the policy;
        # those DNS adds later are made when first traced, see _peer).
        self._peers = {r.name: _peer_attributes(r) for r in upstream.replicas}
        # A first try's whole attributes by method, replica and status (no backoff, no fault).
        self.common: dict[tuple, bytes] = {}

    def _peer(self, name: str | None) -> bytes:
        """A replica's attributes; one DNS added after this layer was built is made on first use."""
        peer = self._peers.get(name)
        if peer is not None:
            return peer
        replicas = self._runtime.replicas
        for replica in replicas:
            if replica.name == name:
                if len(self._peers) > 2 * len(replicas) + 16:  # addresses come and go: stay bounded
                    self._peers = {r.name: _peer_attributes(r) for r in replicas}
                    self.common.clear()
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
        status = reply.status
        extra = b""
        if isinstance(reply, LocalReply):
            reason = reply.reason
            attributes = self._attributes(ex, status, attempt, backoff) + (
                attribute("error.type", reason) + attribute("fender.fault", reason)
            )
            extra = error_status(reason.encode())
        else:
            if attempt == 1:
                key = (ex.method, ex.replica_name, status)
                attributes = self.common.get(key) or self._first(key, ex, status)
            else:
                attributes = self._attributes(ex, status, attempt, backoff)
            if status >= 500:
                extra = error_status(b"HTTP %d" % status)
        self.tracer.exporter.add(
            span(
                state.client_head,
                span_id,
                _CLIENT_NAMES.get(ex.method) or self._name(ex.method),
                start,
                end,
                attributes,
                extra,
            )
        )
        return reply

    def _attributes(self, ex: Exchange, status: int, attempt: int, backoff: float) -> bytes:
        encoded = (
            attribute("http.request.method", ex.method)
            + self.upstream
            + self._peer(ex.replica_name)
            + attribute("fender.attempt", attempt)
            + _BACKOFF
            + pack_double(round(backoff, 3))
            + attribute("http.response.status_code", status)
        )
        if attempt > 1:
            encoded += attribute("http.request.resend_count", attempt - 1)
        return encoded

    def _first(self, key: tuple, ex: Exchange, status: int) -> bytes:
        encoded = self._attributes(ex, status, 1, 0.0)
        if len(self.common) < _LIMIT:
            self.common[key] = encoded
        return encoded

    @staticmethod
    def _name(method: str) -> bytes:
        encoded = name_and_kind(method, CLIENT)
        if len(_CLIENT_NAMES) < 64:  # methods are the client's: stay bounded
            _CLIENT_NAMES[method] = encoded
        return encoded


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
