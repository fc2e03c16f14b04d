"""The cache layer of a route's pipeline (between rate limit and circuit breaker).

Per request: one scan of the client's headers, one dict lookup, one float
comparison for freshness; a hit returns a prebuilt header list plus Age and
Cache-Status. Misses for one URL are coalesced into one upstream request;
stale entries are revalidated with If-None-Match / If-Modified-Since, served
while a background refresh runs (stale-while-revalidate), or served instead
of an upstream failure (stale-if-error). Bodies are stored by tee-ing them as
they stream to the client, up to max_object_size.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import time
from collections import OrderedDict

from proxy.grpc import is_grpc
from proxy.kernel.exchange import Exchange, LocalReply
from proxy.metrics import FastCounter
from proxy.policies.cache import policy as rfc
from proxy.policies.cache.options import CacheStoreOptions
from proxy.policies.cache.purge import tags_of
from proxy.policies.cache.store import Entry, MemoryStore, Variants
from proxy.state import codec
from proxy.state.redis import RedisUnavailable, fleet_state

log = logging.getLogger("fender.cache")

STORE_KEY = "cache.store"
RESULTS = ("hit", "miss", "stale", "revalidated", "bypass", "coalesced", "only_if_cached")
STALE_REASONS = ("stale_while_revalidate", "stale_if_error", "max_stale")
REVALIDATION_RESULTS = ("not_modified", "modified", "unselected", "failed", "head_updated", "head_stale")

# Request fields the layer reads; everything else is skipped in the one scan.
_INTEREST = frozenset(
    {
        b"cache-control",
        b"pragma",
        b"authorization",
        b"if-none-match",
        b"if-modified-since",
        b"if-match",
        b"if-unmodified-since",
        b"if-range",
        b"range",
        b"content-type",  # a gRPC call (application/grpc) is never served from nor stored in the cache
    }
)
# Preconditions only the origin can evaluate (RFC 9111 4.3.2) and range requests: passed through.
_ORIGIN_ONLY = frozenset({b"if-match", b"if-unmodified-since", b"if-range", b"range"})
# Conditional fields removed from a request the cache sends itself (it wants a full response).
_CONDITIONALS = frozenset({b"if-none-match", b"if-modified-since"})

_STATUS_MISS = b"fender; fwd=miss"
# Bound on the hit-for-miss table (keys of URLs recently answered with something not storable).
_MAX_UNCACHEABLE_KEYS = 10_000
# A response carrying none of these can never be reused by a cache (absent route defaults).
_CACHE_RELEVANT = frozenset({b"cache-control", b"expires", b"last-modified", b"etag", b"vary", b"pragma"})


def _nothing_to_cache(headers: list[tuple[bytes, bytes]], relevant: frozenset[bytes]) -> bool:
    for name, _ in headers:
        if name in relevant:
            return False
    return True


_RESPONSE_SAYS_DO_NOT_STORE = frozenset({"no-store", "private", "vary", "must-understand"})
# Framing of the upstream's message; a reply built by the cache sets its own Content-Length.
_FRAMING = frozenset({b"content-length", b"transfer-encoding"})
_STATUS_BYPASS = b"fender; fwd=bypass"
_MISS_STATUS = {
    status: b"fender; fwd=miss; fwd-status=%d" % status for status in (200, 201, 204, 301, 302, 304, 404)
}


class CachedReply:
    """A stored response served to one client (the Reply protocol)."""

    __slots__ = ("status", "headers", "_body", "_sent")

    def __init__(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self._body = body
        self._sent = not body

    complete = True  # stored: the whole body is here
    trailers = None  # not stored

    def has_body(self) -> bool:
        return bool(self._body)

    async def read(self) -> bytes:
        if self._sent:
            return b""
        self._sent = True
        return self._body

    def close(self) -> None:
        self._sent = True


class PrefixedReply:
    """An upstream reply whose first bytes were already read by the cache."""

    __slots__ = ("status", "headers", "_reply", "_prefix")

    def __init__(self, reply, prefix: bytes) -> None:
        self.status = reply.status
        self.headers = reply.headers
        self._reply = reply
        self._prefix = prefix

    @property
    def complete(self) -> bool:
        return self._reply.complete

    @property
    def trailers(self):
        return self._reply.trailers

    def has_body(self) -> bool:
        return self._reply.has_body()

    async def read(self) -> bytes:
        if self._prefix:
            data, self._prefix = self._prefix, b""
            return data
        return await self._reply.read()

    def close(self) -> None:
        self._prefix = b""
        self._reply.close()


class StoringReply:
    """Passes the upstream body through and keeps a copy (up to a limit) to store at its end."""

    __slots__ = ("status", "headers", "_reply", "_parts", "_size", "_limit", "_on_done", "_done")

    def __init__(self, reply, limit: int, on_done) -> None:
        self.status = reply.status
        self.headers = reply.headers
        self._reply = reply
        self._parts: list[bytes] | None = []
        self._size = 0
        self._limit = limit
        self._on_done = on_done
        self._done = False

    @property
    def complete(self) -> bool:
        return self._reply.complete

    @property
    def trailers(self):
        return self._reply.trailers

    def has_body(self) -> bool:
        return self._reply.has_body()

    async def read(self) -> bytes:
        try:
            chunk = await self._reply.read()
        except BaseException:
            self._finish(None)
            raise
        if chunk:
            parts = self._parts
            if parts is not None:
                self._size += len(chunk)
                if self._size > self._limit:
                    self._parts = None  # too big: stream on, never store
                else:
                    parts.append(chunk)
        else:
            parts = self._parts
            self._finish(b"".join(parts) if parts is not None else None)
        return chunk

    def close(self) -> None:
        self._reply.close()
        self._finish(None)

    def _finish(self, body: bytes | None) -> None:
        if not self._done:
            self._done = True
            self._parts = None
            self._on_done(body)


class _Flight:
    """One upstream request that concurrent misses for the same key wait for."""

    __slots__ = ("event", "expires")

    def __init__(self, expires: float) -> None:
        self.event = asyncio.Event()
        self.expires = expires  # injected-clock time after which newcomers stop waiting for it


class _Request:
    """What the client's headers say to the cache, from one scan."""

    __slots__ = (
        "directives",
        "authorized",
        "if_none_match",
        "if_modified_since",
        "conditional",
        "origin_only",
    )

    def __init__(self, headers: list[tuple[bytes, bytes]]) -> None:
        cc: list[bytes] | None = None
        pragma = False
        self.authorized = False
        self.if_none_match: bytes | None = None
        self.if_modified_since: bytes | None = None
        self.origin_only = False
        interest = _INTEREST
        for name, value in headers:
            if name not in interest:
                continue
            if name == b"cache-control":
                if cc is None:
                    cc = []
                cc.append(value)
            elif name == b"pragma":
                pragma = pragma or b"no-cache" in value.lower()
            elif name == b"authorization":
                self.authorized = True
            elif name == b"if-none-match":
                self.if_none_match = (
                    value if self.if_none_match is None else self.if_none_match + b", " + value
                )
            elif name == b"if-modified-since":
                self.if_modified_since = value
            elif name == b"content-type":
                if is_grpc(value):
                    self.origin_only = True  # gRPC: the origin answers every call (issue 21)
            else:
                self.origin_only = True
        self.conditional = self.if_none_match is not None or self.if_modified_since is not None
        self.directives = (
            rfc.RequestDirectives(rfc.parse_cache_control(cc) if cc else None, pragma)
            if cc is not None or pragma
            else None
        )


# What a request without any field in _INTEREST says (most requests): shared, never changed.
_PLAIN_REQUEST = _Request([])


def _request(headers: list[tuple[bytes, bytes]]) -> _Request:
    """The client's headers as the cache reads them; the shared plain one when none matters."""
    interest = _INTEREST
    for name, _ in headers:
        if name in interest:
            return _Request(headers)
    return _PLAIN_REQUEST


class CacheLayer:
    """The cache in front of one route."""

    def __init__(
        self, route, next_handler, ctx, store: MemoryStore, store_options: CacheStoreOptions, l2=None
    ) -> None:
        options = route.cache
        self.next = next_handler
        self.route_name = route.name
        self.route_timeout = route.timeout
        self.clock = ctx.clock
        # Wall-clock seconds = injected-clock seconds + offset (HTTP dates are wall clock).
        self.offset = time.time() - ctx.clock.now()
        self.store = store
        self.max_object_size = store_options.max_object_size
        self.query_mode = options.key.query
        self._query_as_is = self.query_mode == "as-is"
        self.key_headers = tuple(n.encode() for n in options.key.headers)
        self.default_ttl = options.default_ttl
        self.swr = options.stale_while_revalidate
        self.sie = options.stale_if_error
        self.coalesce_timeout = options.coalesce_timeout
        # Purge by tag: the header naming the response's tags (lower-case), None when off.
        self.tag_header = options.tag_header.lower().encode() if options.tag_header else None
        self._strip_tags = self.tag_header is not None and not options.forward_tag_header
        self._flights: dict[bytes, _Flight] = {}
        # URL keys whose last answer was not storable -> until when misses skip coalescing (hit-for-miss).
        self.uncacheable_ttl = options.uncacheable_ttl
        self._uncacheable_refresh = options.uncacheable_ttl / 2  # re-mark when less than this is left
        self._uncacheable: OrderedDict[bytes, float] = OrderedDict()
        # True when only the response itself could make it reusable (no route default TTL or stale windows).
        self._quick_pass = not (self.default_ttl > 0 or self.sie > 0 or self.swr > 0)
        self.max_request_sie = options.max_request_stale_if_error
        self.store_set_cookie = options.set_cookie == "store"
        # Targeted cache-control fields (RFC 9213), obeyed before Cache-Control in this order; the
        # ones meant for Fender alone are removed from every response of this route.
        self.targets = tuple(n.encode() for n in options.targeted_fields)
        self._consumed = rfc.FOR_FENDER_ONLY.intersection(self.targets)
        self._relevant = _CACHE_RELEVANT.union(self.targets)
        self._refreshing: set[bytes] = set()
        self._tasks: set[asyncio.Task] = set()
        m = ctx.metrics
        self.m_result = {r: FastCounter(m.cache_requests.labels(route.name, r)) for r in RESULTS}
        self._count_miss = self.m_result["miss"].inc
        self.m_stale = {r: m.cache_stale_served.labels(route.name, r) for r in STALE_REASONS}
        self.m_reval = {r: m.cache_revalidations.labels(route.name, r) for r in REVALIDATION_RESULTS}
        self.m_coalesced = m.cache_coalesced.labels(route.name)
        uncacheable = self._uncacheable
        m.cache_uncacheable_keys.labels(route.name).set_function(lambda: len(uncacheable))
        # Fleet mode (state.backend: redis): Redis is the second tier (L2), shared by every sidecar.
        self.l2 = l2
        if l2 is not None:
            l2.attach(store)
            self.m_l1 = l2.m_tier["l1"]
            self.m_l2 = l2.m_tier["l2"]
            self.fleet_wait = min(self.coalesce_timeout, l2.options.lock_ttl)
        # Keys whose fleet lock this layer holds (bounded by the flights in progress).
        self._fleet_locked: set[bytes] = set()

    # ------------------------------------------------------------------ entry points

    def key(self, host: bytes | None, target: bytes) -> bytes:
        if self._query_as_is:
            return (host.lower() if host else b"") + target
        return (host.lower() if host else b"") + rfc.normalise_query(target, self.query_mode)

    async def __call__(self, ex: Exchange):
        method = ex.method
        if method != "GET" and method != "HEAD":
            return await self._other_method(ex)
        if ex.upgrade is not None:
            return await self.next(ex)  # switching protocols: nothing to store or serve
        key = self.key(ex.host, ex.target)
        req = _request(ex.request_headers)
        if req.origin_only:
            # If-Match / If-Unmodified-Since / Range: only the origin can answer these correctly.
            self.m_result["bypass"].inc()
            reply = await self.next(ex)
            if not isinstance(reply, LocalReply):
                self._strip(reply)
            if self._strip_tags:
                self._take_tags(reply)
            ex.response_headers.append((b"cache-status", _STATUS_BYPASS))
            return reply
        directives = req.directives
        now = self.clock.now()
        variants = self.store.get(key)
        if variants is None:
            if self.l2 is not None:
                variants = await self._l2_get(key)
                now = self.clock.now()
        elif self.l2 is not None:
            self.m_l1.inc()
        if variants is None and directives is None and method == "GET":
            until = self._uncacheable.get(key) if self._uncacheable else None
            if until is not None and until > now:
                # Hit-for-miss (the common case on a route whose URLs are not storable):
                # straight upstream, as _miss would do after these same checks.
                self._count_miss()
                if req.conditional:
                    self._forward_exchange(ex, None)  # else there is nothing to drop
                reply = await self.next(ex)
                if self._still_uncacheable(ex, key, until, reply):
                    if self._strip_tags:
                        self._take_tags(reply)
                    return reply
                # Something may be storable now, or it failed: the full treatment of a miss.
                return await self._answer(ex, key, None, req, _noop, b"miss", True, reply, now)
        entry = self._select(variants, ex.request_headers) if variants is not None else None
        if entry is not None:
            if directives is None:
                if now < entry.fresh_until:
                    self.m_result["hit"].inc()
                    return self._serve(
                        ex, entry, req, now, b"fender; hit; ttl=%d" % int(entry.fresh_until - now)
                    )
            elif not directives.no_cache:
                usable = self._usable(entry, directives, now)
                if usable is not None:
                    return self._serve_usable(ex, entry, req, now, usable)
            if directives is None or not directives.no_cache:
                if entry.fresh_until <= now < entry.stale_while_revalidate_until and (
                    directives is None or directives.max_age is None
                ):
                    self.m_result["stale"].inc()
                    self.m_stale["stale_while_revalidate"].inc()
                    self._refresh_in_background(ex, key, entry)
                    return self._serve(
                        ex, entry, req, now, b"fender; hit; ttl=%d" % int(entry.fresh_until - now)
                    )
        if directives is not None and directives.only_if_cached:
            self.m_result["only_if_cached"].inc()
            ex.response_headers.append((b"cache-status", b"fender; fwd=miss; detail=only-if-cached"))
            return LocalReply("only_if_cached")
        if method == "HEAD" or (entry is None and directives is not None and directives.no_store):
            # Not coalesced, not stored: the client's request goes upstream as it is.
            self.m_result["miss"].inc()
            request_time = self.clock.now()
            reply = await self.next(ex)
            if not isinstance(reply, LocalReply):
                if method == "HEAD" and variants is not None and reply.status == 200:
                    self._freshen_from_head(ex, key, req, reply, request_time)
                self._strip(reply)
            if self._strip_tags:
                self._take_tags(reply)
            ex.response_headers.append((b"cache-status", _STATUS_MISS))
            return reply
        if entry is not None:
            # Stale (or the client asked for validation): revalidate, one upstream request per key.
            fwd = b"stale" if entry.fresh_until <= now else b"request"
            return await self._miss(ex, key, req, entry, fwd)
        return await self._miss(ex, key, req, None, b"vary-miss" if variants is not None else b"miss")

    # ------------------------------------------------------------------ selection and freshness

    @staticmethod
    def _select(variants: Variants, headers: list[tuple[bytes, bytes]]) -> Entry | None:
        """The newest stored variant whose Vary selection matches this request (RFC 9111 4.1)."""
        for entry in variants.entries:
            if not entry.vary:
                return entry
            if all(
                rfc.selecting_value(headers, n) == v for n, v in zip(entry.vary, entry.selection, strict=True)
            ):
                return entry
        return None

    @staticmethod
    def _usable(entry: Entry, d: rfc.RequestDirectives, now: float) -> str | None:
        """'fresh' or 'max_stale' when the client's directives let the entry be used without the upstream."""
        remaining = entry.fresh_until - now
        if d.max_age is not None and entry.age(now) > d.max_age:
            if d.max_stale is None or entry.must_validate:
                return None
        if remaining > 0:
            return "fresh" if remaining >= d.min_fresh else None
        if d.max_stale is not None and not entry.no_stale and -remaining <= d.max_stale:
            return "max_stale"
        return None

    def _serve_usable(self, ex, entry, req, now, usable: str):
        if usable == "fresh":
            self.m_result["hit"].inc()
        else:
            self.m_result["stale"].inc()
            self.m_stale["max_stale"].inc()
        return self._serve(ex, entry, req, now, b"fender; hit; ttl=%d" % int(entry.fresh_until - now))

    def _serve(self, ex: Exchange, entry: Entry, req: _Request, now: float, status: bytes):
        ex.response_headers.append((b"age", b"%d" % entry.age(now)))
        ex.response_headers.append((b"cache-status", status))
        if (
            req.conditional
            and 200 <= entry.status < 300
            and rfc.not_modified(
                req.if_none_match, req.if_modified_since, entry.etag, entry.last_modified, entry.date
            )
        ):
            return CachedReply(304, rfc.not_modified_headers(entry.headers), b"")
        if ex.method == "HEAD":
            return CachedReply(entry.status, entry.served_headers, b"")
        return CachedReply(entry.status, entry.served_headers, entry.body)

    # ------------------------------------------------------------------ misses and coalescing

    async def _miss(self, ex: Exchange, key: bytes, req: _Request, stale: Entry | None, fwd: bytes):
        if self._uncacheable:
            until = self._uncacheable.get(key)
            if until is not None:
                if until > self.clock.now():
                    # Known not storable: waiting for another miss would only serialise the requests.
                    if stale is None:
                        self.m_result["miss"].inc()
                    return await self._fetch(ex, key, stale, req, _noop, fwd)
                del self._uncacheable[key]
        flight = self._flights.get(key)
        if flight is not None and flight.expires <= self.clock.now():
            # A first request that never finished (its client vanished mid-body): stop waiting for it.
            flight.event.set()
            flight = None
        if flight is not None:
            self.m_coalesced.inc()
            await self._wait(flight)
            now = self.clock.now()
            variants = self.store.get(key)
            entry = self._select(variants, ex.request_headers) if variants is not None else None
            if entry is not None and (
                entry.status < 500
                and now < entry.fresh_until
                and (req.directives is None or self._usable(entry, req.directives, now) == "fresh")
            ):
                self.m_result["coalesced"].inc()
                return self._serve(ex, entry, req, now, b"fender; hit; detail=coalesced")
            # The first request's answer was an error (never fanned out, even when stored), or it
            # was not stored (uncacheable, too big, another variant): go upstream without waiting
            # again; store what may be stored.
            if stale is None:
                self.m_result["miss"].inc()
            return await self._fetch(ex, key, stale, req, _noop, fwd)
        flight = self._flights[key] = _Flight(self.clock.now() + self.coalesce_timeout)
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                if self._flights.get(key) is flight:
                    del self._flights[key]
                flight.event.set()
                if key in self._fleet_locked:
                    # Nothing was stored (not storable, an error, too big): free the fleet's waiters now.
                    self._fleet_locked.discard(key)
                    self.l2.unlock(key)

        try:
            if stale is None and self.l2 is not None and self.fleet_wait > 0:
                served = await self._fleet_coalesce(ex, key, req)
                if served is not None:
                    release()
                    return served
            if stale is None:
                self.m_result["miss"].inc()
            reply = await self._fetch(ex, key, stale, req, release, fwd)
        except BaseException:
            release()
            raise
        return reply

    # ------------------------------------------------------------------ the fleet tier (Redis)

    async def _l2_get(self, key: bytes) -> Variants | None:
        """L1 missed: read the fleet's copy. Redis failing or slow is a miss, never an error."""
        try:
            blob = await self.l2.get_blob(key)
        except RedisUnavailable:
            return None
        if blob is None:
            return None
        variants = codec.decode(blob, self.offset)
        if variants is None:
            await self.l2.invalid(key)  # unreadable: deleted, never served
            return None
        self.m_l2.inc()
        self.store.put(key, variants)
        return variants

    async def _fleet_coalesce(self, ex: Exchange, key: bytes, req: _Request):
        """Fleet-wide coalescing: unless this sidecar gets the key's Redis lock, wait for the
        sidecar holding it to store the response in L2 (bounded by coalesce_timeout and lock_ttl).
        Returns the reply to serve, or None to go upstream."""
        if await self.l2.try_lock(key):
            self._fleet_locked.add(key)
            return None
        self.m_coalesced.inc()
        clock = self.clock
        deadline = clock.now() + self.fleet_wait
        delay = 0.005
        while clock.now() < deadline and not self.l2.breaker.is_open:
            await clock.sleep(min(delay, max(deadline - clock.now(), 0.0)))
            delay = min(delay * 2, 0.05)
            try:
                blob, locked = await self.l2.poll(key)
            except RedisUnavailable:
                return None
            if blob is None:
                if locked:
                    continue
                return None  # the holder stored nothing (or gave up): go upstream
            variants = codec.decode(blob, self.offset)
            if variants is None:
                await self.l2.invalid(key)
                return None
            self.m_l2.inc()
            self.store.put(key, variants)
            now = clock.now()
            entry = self._select(variants, ex.request_headers)
            if entry is not None and (
                entry.status < 500
                and now < entry.fresh_until
                and (req.directives is None or self._usable(entry, req.directives, now) == "fresh")
            ):
                self.m_result["coalesced"].inc()
                return self._serve(ex, entry, req, now, b"fender; hit; detail=coalesced-fleet")
            return None
        return None

    def _remember_uncacheable(self, key: bytes, now: float) -> None:
        table = self._uncacheable
        table[key] = now + self.uncacheable_ttl
        table.move_to_end(key)
        if len(table) > _MAX_UNCACHEABLE_KEYS:
            table.popitem(last=False)

    async def _wait(self, flight: _Flight) -> None:
        """Wait for the first request's outcome, at most coalesce_timeout on the injected clock."""
        waiter = asyncio.ensure_future(flight.event.wait())
        timer = asyncio.ensure_future(self.clock.sleep(self.coalesce_timeout))
        try:
            await asyncio.wait((waiter, timer), return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
            timer.cancel()

    def _forward_exchange(self, ex: Exchange, entry: Entry | None) -> None:
        """Drop the client's conditionals (the cache wants a full response); add the stored validators."""
        if entry is None:
            for name, _ in ex.headers:
                if name in _CONDITIONALS:
                    break
            else:
                return  # nothing to drop or add: keep the list as it is (the usual miss)
        headers = [(n, v) for n, v in ex.headers if n not in _CONDITIONALS]
        if entry is not None:
            if entry.etag is not None:
                headers.append((b"if-none-match", entry.etag))
            if entry.last_modified is not None:
                headers.append((b"if-modified-since", entry.last_modified))
        ex.headers = headers

    async def _fetch(
        self,
        ex: Exchange,
        key: bytes,
        stale: Entry | None,
        req: _Request,
        release,
        fwd: bytes,
        count: bool = True,
    ):
        """Send the request upstream, store what may be stored, answer the client.

        ``count`` is False for background refreshes, which answer no client.
        """
        request_time = self.clock.now()
        self._forward_exchange(ex, stale)
        reply = await self.next(ex)
        return await self._answer(ex, key, stale, req, release, fwd, count, reply, request_time)

    def _still_uncacheable(self, ex: Exchange, key: bytes, until: float, reply) -> bool:
        """Hit-for-miss: True (Cache-Status added) when the upstream's answer is still not storable."""
        if (
            self._quick_pass
            and not isinstance(reply, LocalReply)
            and reply.status < 500
            and _nothing_to_cache(reply.headers, self._relevant)
        ):
            now = self.clock.now()
            if until - now < self._uncacheable_refresh:
                self._remember_uncacheable(key, now)  # still not storable: keep the mark (and its LRU place)
            status = _MISS_STATUS.get(reply.status) or b"fender; fwd=miss; fwd-status=%d" % reply.status
            ex.response_headers.append((b"cache-status", status))
            return True
        return False

    async def _answer(self, ex, key, stale, req, release, fwd, count, reply, request_time):
        """What _fetch does with the upstream's reply: serve stale on error, merge a 304, store, answer."""
        now = self.clock.now()
        failed = isinstance(reply, LocalReply) or reply.status >= 500
        tags = (
            self._take_tags(reply)
            if self.tag_header is not None and not isinstance(reply, LocalReply)
            else ()
        )
        if stale is not None:
            if failed:
                self.m_reval["failed"].inc()
                if now < stale.stale_if_error_until or self._client_accepts_stale(req, stale, now):
                    release()
                    reply.close()
                    if count:
                        self.m_result["stale"].inc()
                        self.m_stale["stale_if_error"].inc()
                    status = b"fender; fwd=stale; fwd-status=%d; detail=stale-if-error" % reply.status
                    return self._serve(ex, stale, req, now, status)
            elif reply.status == 304:
                return await self._not_modified(
                    ex, key, stale, req, release, fwd, count, reply, request_time, tags
                )
            else:
                self.m_reval["modified"].inc()
            if count:
                self.m_result["miss"].inc()
        if failed and (stale is not None or isinstance(reply, LocalReply)):
            # Fender's own fault replies are never stored, nor does an upstream error replace a stored response.
            release()
            if not isinstance(reply, LocalReply):
                self._strip(reply)
            ex.response_headers.append(
                (b"cache-status", b"fender; fwd=%s; fwd-status=%d" % (fwd, reply.status))
            )
            return reply
        if self._quick_pass and not failed and _nothing_to_cache(reply.headers, self._relevant):
            # No freshness, validators or Vary, and the route grants no default TTL or stale
            # window: nothing here could be reused, so skip the full RFC 9111 analysis.
            release()
            if self.uncacheable_ttl > 0:
                self._remember_uncacheable(key, now)
            ex.response_headers.append(
                (b"cache-status", b"fender; fwd=%s; fwd-status=%d" % (fwd, reply.status))
            )
            return reply
        analysis = rfc.analyse(
            reply.status,
            reply.headers,
            request_authorized=req.authorized,
            request_no_store=req.directives is not None and req.directives.no_store,
            request_time=request_time + self.offset,
            response_time=now + self.offset,
            default_ttl=self.default_ttl,
            store_set_cookie=self.store_set_cookie,
            targets=self.targets,
        )
        self._strip(reply)
        if (
            not analysis.storable
            or not rfc.worth_storing(analysis, self.sie, self.swr)
            or (failed and not analysis.explicit)
        ):
            # (A 5xx is stored only when the upstream gave it explicit freshness.)
            release()
            if not failed and self.uncacheable_ttl > 0:
                self._remember_uncacheable(key, now)
            if stale is not None and analysis.why_not in _RESPONSE_SAYS_DO_NOT_STORE:
                # The upstream now forbids storing this URL: drop what we have. (Reasons coming
                # from the request, like its no-store or Authorization, must not let a client purge.)
                self.store.delete(key)
                if self.l2 is not None:
                    task = asyncio.ensure_future(self.l2.invalidate([key]))
                    self._tasks.add(task)
                    task.add_done_callback(self._tasks.discard)
            ex.response_headers.append(
                (b"cache-status", b"fender; fwd=%s; fwd-status=%d" % (fwd, reply.status))
            )
            return reply
        length = rfc.combined(reply.headers, b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_object_size:
            release()
            ex.response_headers.append(
                (b"cache-status", b"fender; fwd=%s; fwd-status=%d; detail=too-big" % (fwd, reply.status))
            )
            return reply
        status_value = b"fender; fwd=%s; fwd-status=%d; stored" % (fwd, reply.status)

        if self._uncacheable:
            self._uncacheable.pop(key, None)

        def store(body: bytes | None) -> None:
            try:
                if body is not None:
                    entry = self._entry(reply.status, analysis, body, ex, now)
                    entry.tags = tags
                    self._put(key, entry)
            finally:
                release()

        if not reply.has_body():
            store(b"")
            reply.close()
            ex.response_headers.append((b"cache-status", status_value))
            return self._conditional_or(ex, req, reply, analysis)
        if req.conditional:
            # Read the body here: the client may get a 304 built from it.
            return await self._read_then_answer(ex, req, reply, analysis, store, status_value, now)
        ex.response_headers.append((b"cache-status", status_value))
        return StoringReply(reply, self.max_object_size, store)

    async def _read_then_answer(self, ex, req, reply, analysis, store, status_value, now):
        parts: list[bytes] = []
        size = 0
        try:
            while True:
                chunk = await reply.read()
                if not chunk:
                    break
                parts.append(chunk)
                size += len(chunk)
                if size > self.max_object_size:
                    store(None)
                    ex.response_headers.append((b"cache-status", b"fender; fwd=miss; detail=too-big"))
                    return PrefixedReply(reply, b"".join(parts))
        except BaseException:
            store(None)
            reply.close()
            raise
        body = b"".join(parts)
        store(body)
        ex.response_headers.append((b"cache-status", status_value))
        headers = [h for h in reply.headers if h[0] not in _FRAMING]
        if 200 <= reply.status < 300 and rfc.not_modified(
            req.if_none_match, req.if_modified_since, analysis.etag, analysis.last_modified, analysis.date
        ):
            return CachedReply(304, rfc.not_modified_headers(headers), b"")
        return CachedReply(reply.status, headers + [(b"content-length", b"%d" % len(body))], body)

    def _conditional_or(self, ex, req, reply, analysis):
        headers = [h for h in reply.headers if h[0] not in _FRAMING]
        if (
            req.conditional
            and 200 <= reply.status < 300
            and rfc.not_modified(
                req.if_none_match, req.if_modified_since, analysis.etag, analysis.last_modified, analysis.date
            )
        ):
            return CachedReply(304, rfc.not_modified_headers(headers), b"")
        return CachedReply(reply.status, headers + [(b"content-length", b"0")], b"")

    # ------------------------------------------------------------------ revalidation

    def _strip(self, reply) -> None:
        """Remove the fields addressed to Fender alone (Surrogate-Control, Fender-Cache-Control)."""
        consumed = self._consumed
        if consumed:
            for name, _ in reply.headers:
                if name in consumed:
                    reply.headers = [h for h in reply.headers if h[0] not in consumed]
                    return

    def _client_accepts_stale(self, req: _Request, stale: Entry, now: float) -> bool:
        """The request's own stale-if-error (RFC 5861 4), bounded by max_request_stale_if_error."""
        d = req.directives
        if d is None or not d.stale_if_error or stale.no_stale:
            return False
        return now - stale.fresh_until <= min(d.stale_if_error, self.max_request_sie)

    def _update_fields(self, headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
        """The fields of a 304 or HEAD response that go into a stored response (3.2).

        Without set_cookie: store, its Set-Cookie is for the client that asked, never stored.
        """
        if self.store_set_cookie:
            return headers
        return [h for h in headers if h[0] not in rfc.SET_COOKIE]

    async def _not_modified(
        self, ex, key, stale: Entry, req, release, fwd, count, reply, request_time, tags=()
    ):
        """A 304 to the cache's own conditional request: update the stored response(s) it selects."""
        fresh_headers = reply.headers
        reply.close()
        now = self.clock.now()
        variants = self.store.get(key)
        entries = list(variants.entries) if variants is not None else []
        if not any(e is stale for e in entries):
            entries.insert(0, stale)
        etag = rfc.header_values(fresh_headers, b"etag")
        last_modified = rfc.header_values(fresh_headers, b"last-modified")
        if etag or last_modified:
            chosen = rfc.select_for_update(
                [(e.etag, e.last_modified) for e in entries],
                etag[0] if etag else None,
                last_modified[0] if last_modified else None,
            )
        else:
            # No validator at all: the 304 answers the conditional request sent for this entry.
            chosen = [next(i for i, e in enumerate(entries) if e is stale)]
        update = self._update_fields(fresh_headers)
        ages = [h for h in fresh_headers if h[0] == b"age"]  # for the new entry's age (4.2.3)
        served = None
        for i in chosen:
            e = entries[i]
            merged = rfc.merge_304(e.headers + e.held, update) + ages
            like = None if e is stale else e
            new = self._entry_from(e.status, merged, e.body, ex, req, request_time, now, like)
            if new is not None:
                new.tags = tags or e.tags  # a 304 without the tag header keeps the entry's tags
                self._put(key, new)
            if e is stale:
                served = new if new is not None else stale
        if served is None:
            # RFC 9111 4.3.4: a 304 that selects no stored response (e.g. a new strong ETag) updates
            # nothing and cannot answer this request: ask again, unconditionally.
            self.m_reval["unselected"].inc()
            if count:
                self.m_result["miss"].inc()
            ex.headers = [(n, v) for n, v in ex.headers if n not in _CONDITIONALS]
            request_time = self.clock.now()
            reply = await self.next(ex)
            return await self._answer(ex, key, None, req, release, fwd, False, reply, request_time)
        self.m_reval["not_modified"].inc()
        if count:
            self.m_result["revalidated"].inc()
        release()
        reply = self._serve(ex, served, req, now, b"fender; fwd=stale; fwd-status=304")
        if served.held:
            # Just revalidated: the no-cache="..." fields may go to this client (RFC 9111 5.2.2.4).
            full = served.validated_headers()
            reply.headers = rfc.not_modified_headers(full) if reply.status == 304 else full
        if not self.store_set_cookie:
            cookies = [h for h in fresh_headers if h[0] in rfc.SET_COOKIE]
            if cookies:
                # The 304 answered this client's request: its cookies are for this client only.
                reply.headers = reply.headers + cookies
        return reply

    def _freshen_from_head(self, ex: Exchange, key: bytes, req: _Request, reply, request_time: float) -> None:
        """RFC 9111 4.3.5: a HEAD 200 updates each stored GET response this request could have
        chosen when the validators (and Content-Length) match, and makes it stale otherwise."""
        variants = self.store.get(key)
        if variants is None:
            return
        now = self.clock.now()
        headers = reply.headers
        update = self._update_fields(headers)
        ages = [h for h in headers if h[0] == b"age"]
        for e in list(variants.entries):
            if self._select(Variants([e]), ex.request_headers) is None:
                continue
            new = None
            if rfc.head_matches(e.etag, e.last_modified, len(e.body), headers):
                merged = rfc.merge_304(e.headers + e.held, update) + ages
                new = self._entry_from(e.status, merged, e.body, ex, req, request_time, now)
            if new is None:
                new = copy.copy(e)
                new.fresh_until = min(e.fresh_until, now)
                new.stale_while_revalidate_until = min(e.stale_while_revalidate_until, now)
                self.m_reval["head_stale"].inc()
            else:
                self.m_reval["head_updated"].inc()
            self._put(key, new)

    def _refresh_in_background(self, ex: Exchange, key: bytes, entry: Entry) -> None:
        """stale-while-revalidate: one refresh per key at a time."""
        if key in self._refreshing:
            return
        self._refreshing.add(key)
        refresh = Exchange(
            "GET",
            ex.target,
            list(ex.headers),
            ex.host,
            b"",
            None,
            None,
            ex.request_id,
            ex.route_name,
            ex.started,
            ex.client,
            ex.request_headers,
            self.clock.now() + self.route_timeout,
        )
        refresh.upstream_target = ex.upstream_target
        task = asyncio.ensure_future(self._refresh(refresh, key, entry))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _refresh(self, ex: Exchange, key: bytes, entry: Entry) -> None:
        try:
            reply = await self._fetch(
                ex, key, entry, _Request(ex.request_headers), _noop, b"stale", count=False
            )
            # Drain the answer like a client would, so a StoringReply stores it.
            try:
                while await reply.read():
                    pass
            finally:
                reply.close()
        except Exception:  # noqa: BLE001 - a failed background refresh leaves the stale entry in place
            log.debug("background refresh of %r failed", key, exc_info=True)
        finally:
            self._refreshing.discard(key)

    # ------------------------------------------------------------------ storing

    def _take_tags(self, reply) -> tuple[bytes, ...]:
        """The response's cache tags; its tag header removed unless forward_tag_header."""
        name = self.tag_header
        headers = reply.headers
        values = [v for n, v in headers if n == name]
        if not values:
            return ()
        if self._strip_tags:
            headers[:] = [h for h in headers if h[0] != name]
        return tags_of(values)

    def _vary_of(self, analysis: rfc.Analysis) -> tuple[bytes, ...]:
        names = self.key_headers + (analysis.vary or ())
        return tuple(dict.fromkeys(names))

    def _entry(
        self, status: int, analysis: rfc.Analysis, body: bytes, ex: Exchange, now: float, like=None
    ) -> Entry | None:
        """The entry to store; ``like``: the stored variant it updates, when not this request's own
        (keeps that variant's selection; None if the update changed its Vary)."""
        vary = self._vary_of(analysis)
        if like is None:
            selection = tuple(rfc.selecting_value(ex.request_headers, n) for n in vary)
        elif vary == like.vary:
            selection = like.selection
        else:
            return None
        allow_stale = not analysis.no_stale
        route_swr = 0.0 if analysis.bad_age else self.swr  # unknown age: never served unvalidated
        return Entry(
            status,
            analysis.headers,
            body,
            etag=analysis.etag,
            last_modified=analysis.last_modified,
            date=analysis.date,
            vary=vary,
            selection=selection,
            response_time=now,
            initial_age=analysis.initial_age,
            lifetime=analysis.lifetime,
            swr=max(analysis.swr, route_swr) if allow_stale else 0.0,
            sie=max(analysis.sie, self.sie) if allow_stale else 0.0,
            must_validate=analysis.must_validate,
            no_stale=analysis.no_stale,
            held=analysis.held,
        )

    def _entry_from(
        self, status, headers, body, ex, req: _Request, request_time: float, now: float, like=None
    ) -> Entry | None:
        analysis = rfc.analyse(
            status,
            headers,
            request_authorized=req.authorized,
            request_no_store=False,
            request_time=request_time + self.offset,
            response_time=now + self.offset,
            default_ttl=self.default_ttl,
            store_set_cookie=self.store_set_cookie,
            targets=self.targets,
        )
        if not analysis.storable:
            return None
        return self._entry(status, analysis, body, ex, now, like)

    def _put(self, key: bytes, entry: Entry) -> None:
        variants = self.store.get(key)
        value = variants.with_entry(entry) if variants is not None else Variants([entry])
        self.store.put(key, value)
        if self.l2 is not None:
            self._fleet_locked.discard(key)  # the L2 write releases the fleet lock with it
            # Kept in Redis until the last stale window ends; written in the background.
            ttl = codec.expiry(value, self.clock.now())
            if ttl > 0:
                tags = {t for e in value.entries for t in e.tags}
                self.l2.put_blob(key, codec.encode(value, self.offset), int(ttl * 1000) + 1, tags)

    # ------------------------------------------------------------------ unsafe methods

    async def _other_method(self, ex: Exchange):
        reply = await self.next(ex)
        if self._strip_tags and not isinstance(reply, LocalReply):
            self._take_tags(reply)
        ex.response_headers.append((b"cache-status", _STATUS_BYPASS))
        if not isinstance(reply, LocalReply):
            self._strip(reply)
        self.m_result["bypass"].inc()
        if (
            ex.method not in rfc.SAFE_METHODS
            and not isinstance(reply, LocalReply)
            and 200 <= reply.status < 400
        ):
            # RFC 9111 4.4: invalidate the target URI and same-origin Location / Content-Location.
            keys = [self.key(ex.host, ex.target)]
            for name, value in reply.headers:
                if name == b"location" or name == b"content-location":
                    target = rfc.same_origin_target(value, ex.host, ex.target)
                    if target is not None:
                        keys.append(self.key(ex.host, target))
            for key in keys:
                self.store.delete(key)
            if self.l2 is not None:
                # Before the response goes out, so a client reading through another sidecar next sees
                # the change (at most state.redis.timeout longer; on failure, L1 only).
                await self.l2.invalidate(keys)
        return reply

    def invalidate(self, host: bytes | None, target: bytes) -> None:
        key = self.key(host, target)
        self.store.delete(key)
        if self.l2 is not None:
            task = asyncio.ensure_future(self.l2.invalidate([key]))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)


def _noop() -> None:
    return None


def shared_store(ctx) -> MemoryStore:
    """The one store of this Fender (top-level ``cache:``), created on first use."""
    options = getattr(ctx.policy, "cache", None) or CacheStoreOptions()
    store = _kept_store(ctx, options)
    ctx.expose("cache", "store", store)
    if store.max_size != options.max_size:
        store.resize(options.max_size)
    return store


def _new_store(ctx, options: CacheStoreOptions) -> MemoryStore:
    metrics = ctx.metrics
    store = MemoryStore(options.max_size, on_evict=metrics.cache_evictions.inc)
    metrics.cache_bytes.set_function(lambda: store.bytes)
    metrics.cache_entries.set_function(lambda: store.entries)
    return store


def _kept_store(ctx, options: CacheStoreOptions) -> MemoryStore:
    """The previous runtime's store on a reload (entries survive), else a new one.

    Any change of the top-level ``cache:`` section keeps the store: a new max_size resizes it
    in place (least recently used entries are evicted down to the new bound, see shared_store),
    a new max_object_size applies to what is stored from then on.
    """
    return ctx.keep(STORE_KEY, "memory", lambda: _new_store(ctx, options))


def build_layer(route, next_handler, ctx):
    options = getattr(route, "cache", None)
    if options is None or not options.enabled:
        return None
    store_options = getattr(ctx.policy, "cache", None) or CacheStoreOptions()
    return CacheLayer(route, next_handler, ctx, shared_store(ctx), store_options, fleet_state(ctx))
