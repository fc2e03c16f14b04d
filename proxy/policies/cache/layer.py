"""The cache layer of a route's pipeline (between rate limit and circuit breaker).

Per request: one scan of the client's headers, one dict lookup, one float
comparison for freshness; a hit returns a prebuilt header list plus Age and
Cache-Status. Misses for one URL are coalesced into one upstream request;
stale entries are revalidated with If-None-Match / If-Modified-Since, served
while a background refresh runs (stale-while-revalidate), or served instead
of an upstream failure (stale-if-error). Bodies are stored by tee-ing them as
they stream to the client, up to max_object_size.

This module decides which of those a request gets; the parts live beside it:
route.py (settings, metrics, storing), request.py, replies.py (answers),
revalidate.py, refresh.py, coalesce.py, fleet.py (Redis, L2), rfc9111.py.
"""

from __future__ import annotations

from typing import Any

from proxy.config.models import Route
from proxy.kernel.exchange import Exchange, Handler, LocalReply
from proxy.policies.cache import rfc9111 as rfc
from proxy.policies.cache.coalesce import coalesced
from proxy.policies.cache.options import CacheStoreOptions
from proxy.policies.cache.refresh import refresh_in_background
from proxy.policies.cache.replies import STATUS_BYPASS, STATUS_MISS, answer, fetch, miss_status, serve
from proxy.policies.cache.request import Request, forwarded_headers, request_of
from proxy.policies.cache.revalidate import freshen_from_head
from proxy.policies.cache.route import RouteCache, no_release
from proxy.policies.cache.store import Entry, MemoryStore
from proxy.policies.context import LayerContext
from proxy.state.redis import RedisState, fleet_state

STORE_KEY = "cache.store"


class CacheLayer(RouteCache):
    """The cache in front of one route."""

    def __init__(
        self,
        route: Route,
        next_handler: Handler,
        ctx: LayerContext,
        store: MemoryStore,
        store_options: CacheStoreOptions,
        l2: RedisState | None = None,
    ) -> None:
        super().__init__(route, next_handler, ctx, store, store_options, l2)
        # Bound once for the request path.
        self._count_miss = self.m_result["miss"].inc
        self._uncacheable = self.hit_for_miss.table

    async def __call__(self, ex: Exchange) -> Any:
        method = ex.method
        if method != "GET" and method != "HEAD":
            return await self._other_method(ex)
        if ex.upgrade is not None:
            return await self.next(ex)  # switching protocols: nothing to store or serve
        key = self.key(ex.host, ex.target)
        req = request_of(ex.request_headers)
        if req.origin_only:
            # If-Match / If-Unmodified-Since / Range: only the origin can answer these correctly.
            self.m_result["bypass"].inc()
            reply = await self.next(ex)
            self.strip_fender_only(reply)
            ex.response_headers.append((b"cache-status", STATUS_BYPASS))
            return reply
        directives = req.directives
        now = self.clock.now()
        variants = self.store.get(key)
        fleet = self.fleet
        if variants is None:
            if fleet is not None:
                variants = await fleet.get(key)
                now = self.clock.now()
        elif fleet is not None:
            fleet.m_l1.inc()
        if variants is None and directives is None and method == "GET":
            until = self._uncacheable.get(key) if self._uncacheable else None
            if until is not None and until > now:
                return await self._hit_for_miss(ex, key, req, until, now)
        entry = variants.select(ex.request_headers) if variants is not None else None
        if entry is not None:
            if directives is None:
                if now < entry.fresh_until:
                    self.m_result["hit"].inc()
                    return serve(ex, entry, req, now, b"fender; hit; ttl=%d" % int(entry.fresh_until - now))
            elif not directives.no_cache:
                usable = entry.usable(directives, now)
                if usable is not None:
                    if usable == "fresh":
                        self.m_result["hit"].inc()
                    else:
                        self.m_result["stale"].inc()
                        self.m_stale["max_stale"].inc()
                    return serve(ex, entry, req, now, b"fender; hit; ttl=%d" % int(entry.fresh_until - now))
            if directives is None or not directives.no_cache:
                if entry.fresh_until <= now < entry.stale_while_revalidate_until and (
                    directives is None or directives.max_age is None
                ):
                    self.m_result["stale"].inc()
                    self.m_stale["stale_while_revalidate"].inc()
                    refresh_in_background(self, ex, key, entry)
                    return serve(ex, entry, req, now, b"fender; hit; ttl=%d" % int(entry.fresh_until - now))
        if directives is not None and directives.only_if_cached:
            self.m_result["only_if_cached"].inc()
            ex.response_headers.append((b"cache-status", b"fender; fwd=miss; detail=only-if-cached"))
            return LocalReply("only_if_cached")
        if method == "HEAD" or (entry is None and directives is not None and directives.no_store):
            # Not coalesced, not stored: the client's request goes upstream as it is.
            self.m_result["miss"].inc()
            request_time = self.clock.now()
            reply = await self.next(ex)
            if (
                method == "HEAD"
                and variants is not None
                and not isinstance(reply, LocalReply)
                and reply.status == 200
            ):
                freshen_from_head(self, ex, key, req, reply, request_time)
            self.strip_fender_only(reply)
            ex.response_headers.append((b"cache-status", STATUS_MISS))
            return reply
        if entry is not None:
            # Stale (or the client asked for validation): revalidate, one upstream request per key.
            return await self._miss(ex, key, req, entry, b"stale" if entry.fresh_until <= now else b"request")
        return await self._miss(ex, key, req, None, b"vary-miss" if variants is not None else b"miss")

    async def _hit_for_miss(self, ex: Exchange, key: bytes, req: Request, until: float, now: float) -> Any:
        """A GET of a URL recently answered with something not storable (the common case on a
        route whose URLs are not storable), nothing stored, no Cache-Control from the client:
        straight upstream, as _miss would do after these same checks (the fast twin of
        _miss -> fetch -> answer; tests/test_cache_twins.py checks they agree).

        Kept for speed: without it the bench's all-policies route (a hit-for-miss URL) costs
        +5.4% and +5.6% instructions per request (callgrind, `tests/bench/instructions.py --only
        policies`, two runs of 2000 requests each beside this tree: 323.8k vs 307.2k, 336.1k vs
        318.2k). Its one difference: the mark is renewed only when less than half is left."""
        self._count_miss()
        if req.conditional:
            ex.headers = forwarded_headers(ex.headers, None)
        reply = await self.next(ex)
        if self.quick_pass and not isinstance(reply, LocalReply) and reply.status < 500:
            # One scan: anything that could make it storable now, and the tag header to remove.
            relevant = self._relevant
            watched = self._watched
            tagged = False
            for name, _ in reply.headers:
                if name in watched:
                    if name in relevant:
                        break
                    tagged = True
            else:
                # Still not storable: keep the mark (and its LRU place) when less than half is left.
                now = self.clock.now()
                if until - now < self.hit_for_miss.refresh:
                    self.hit_for_miss.remember(key, now)
                ex.response_headers.append((b"cache-status", miss_status(reply.status)))
                if tagged:
                    self.drop_tag_header(reply)
                return reply
        # Something may be storable now, or it failed: the full treatment of a miss.
        return await answer(
            self,
            ex,
            reply,
            key=key,
            stale=None,
            req=req,
            release=no_release,
            fwd=b"miss",
            count=True,
            request_time=now,
        )

    async def _miss(self, ex: Exchange, key: bytes, req: Request, stale: Entry | None, fwd: bytes) -> Any:
        """Upstream, one request per key: wait for a miss already in flight (here, or in the fleet)
        and serve what it stored, or lead one and wake the others when its outcome is known."""
        table = self._uncacheable
        if table:
            until = table.get(key)
            if until is not None:
                if until > self.clock.now():
                    # Known not storable: waiting for another miss would only serialise the requests.
                    if stale is None:
                        self.m_result["miss"].inc()
                    return await fetch(self, ex, key=key, stale=stale, req=req, release=no_release, fwd=fwd)
                del table[key]
        flights = self.flights
        flight = flights.joinable(key)
        if flight is not None:
            self.m_coalesced.inc()
            await flights.wait(flight)
            now = self.clock.now()
            entry = coalesced(self.store.get(key), ex.request_headers, req, now)
            if entry is not None:
                self.m_result["coalesced"].inc()
                return serve(ex, entry, req, now, b"fender; hit; detail=coalesced")
            # The first request's answer was an error (never fanned out, even when stored), or it
            # was not stored (uncacheable, too big, another variant): go upstream without waiting
            # again; store what may be stored.
            if stale is None:
                self.m_result["miss"].inc()
            return await fetch(self, ex, key=key, stale=stale, req=req, release=no_release, fwd=fwd)
        flight = flights.lead(key)
        fleet = self.fleet
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                flights.land(key, flight)
                if fleet is not None:
                    fleet.unlock(key)  # when this layer holds the fleet lock and stored nothing

        try:
            if stale is None and fleet is not None and fleet.wait > 0 and not await fleet.try_lock(key):
                # Another sidecar fetches this key: wait for its L2 write (bounded).
                self.m_coalesced.inc()
                variants = await fleet.poll(key, self.clock)
                now = self.clock.now()
                entry = coalesced(variants, ex.request_headers, req, now)
                if entry is not None:
                    self.m_result["coalesced"].inc()
                    served = serve(ex, entry, req, now, b"fender; hit; detail=coalesced-fleet")
                    release()
                    return served
            if stale is None:
                self.m_result["miss"].inc()
            return await fetch(self, ex, key=key, stale=stale, req=req, release=release, fwd=fwd)
        except BaseException:
            release()
            raise

    async def _other_method(self, ex: Exchange) -> Any:
        """Unsafe and other methods: passed through; a success invalidates the URLs it names."""
        reply = await self.next(ex)
        local = isinstance(reply, LocalReply)
        if not local:
            self.strip_fender_only(reply)
        ex.response_headers.append((b"cache-status", STATUS_BYPASS))
        self.m_result["bypass"].inc()
        if ex.method not in rfc.SAFE_METHODS and not local and 200 <= reply.status < 400:
            # RFC 9111 4.4: invalidate the target URI and same-origin Location / Content-Location.
            keys = [self.key(ex.host, ex.target)]
            for name, value in reply.headers:
                if name == b"location" or name == b"content-location":
                    target = rfc.same_origin_target(value, ex.host, ex.target)
                    if target is not None:
                        keys.append(self.key(ex.host, target))
            for key in keys:
                self.store.delete(key)
            if self.fleet is not None:
                # Before the response goes out, so a client reading through another sidecar next sees
                # the change (at most state.redis.timeout longer; on failure, L1 only).
                await self.fleet.invalidate(keys)
        return reply

    def invalidate(self, host: bytes | None, target: bytes) -> None:
        self.drop([self.key(host, target)])


def shared_store(ctx: LayerContext) -> MemoryStore:
    """The one store of this Fender (top-level ``cache:``), created on first use."""
    options = getattr(ctx.policy, "cache", None) or CacheStoreOptions()
    store = _kept_store(ctx, options)
    ctx.expose("cache", "store", store)
    if store.max_size != options.max_size:
        store.resize(options.max_size)
    return store


def _new_store(ctx: LayerContext, options: CacheStoreOptions) -> MemoryStore:
    metrics = ctx.metrics
    store = MemoryStore(options.max_size, on_evict=metrics.cache_evictions.inc)
    metrics.cache_bytes.set_function(lambda: store.bytes)
    metrics.cache_entries.set_function(lambda: store.entries)
    return store


def _kept_store(ctx: LayerContext, options: CacheStoreOptions) -> MemoryStore:
    """The previous runtime's store on a reload (entries survive), else a new one.

    Any change of the top-level ``cache:`` section keeps the store: a new max_size resizes it
    in place (least recently used entries are evicted down to the new bound, see shared_store),
    a new max_object_size applies to what is stored from then on.
    """
    return ctx.keep(STORE_KEY, "memory", lambda: _new_store(ctx, options))


def build_layer(route: Route, next_handler: Handler, ctx: LayerContext) -> CacheLayer | None:
    options = getattr(route, "cache", None)
    if options is None or not options.enabled:
        return None
    store_options = getattr(ctx.policy, "cache", None) or CacheStoreOptions()
    return CacheLayer(route, next_handler, ctx, shared_store(ctx), store_options, fleet_state(ctx))
