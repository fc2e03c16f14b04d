"""What every part of one route's cache shares: its settings (read once per load), metrics,
store and tiers, and the steps of storing a response (entry, put, drop).

The layer (layer.py) is a RouteCache; replies.py, revalidate.py and refresh.py
take one as their first argument.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Coroutine
from typing import Any

from proxy.config.models import Route
from proxy.kernel.exchange import Exchange, Handler, LocalReply, Reply
from proxy.metrics import FastCounter
from proxy.policies.cache import rfc9111 as rfc
from proxy.policies.cache.coalesce import Flights, HitForMiss
from proxy.policies.cache.fleet import FleetTier
from proxy.policies.cache.options import CacheStoreOptions
from proxy.policies.cache.request import Request
from proxy.policies.cache.store import Entry, MemoryStore, Variants
from proxy.policies.context import LayerContext
from proxy.state.redis import RedisState

RESULTS = ("hit", "miss", "stale", "revalidated", "bypass", "coalesced", "only_if_cached")
STALE_REASONS = ("stale_while_revalidate", "stale_if_error", "max_stale")
REVALIDATION_RESULTS = ("not_modified", "modified", "unselected", "failed", "head_updated", "head_stale")

# A response carrying none of these can never be reused by a cache (absent route defaults).
_CACHE_RELEVANT = frozenset({b"cache-control", b"expires", b"last-modified", b"etag", b"vary", b"pragma"})

# What one scan of a response's fields found (Fields.found): bits.
RELEVANT = 1  # a field that could make it reusable (_CACHE_RELEVANT or a targeted field)
CONSUMED = 2  # a targeted field for Fender alone (removed before the client)


def no_release() -> None:
    """The ``release`` of a request no other miss waits for."""
    return None


class RouteCache:
    """The cache of one route: settings, metrics, store, tiers; the storing steps."""

    def __init__(
        self,
        route: Route,
        next_handler: Handler,
        ctx: LayerContext,
        store: MemoryStore,
        store_options: CacheStoreOptions,
        l2: RedisState | None = None,
    ) -> None:
        options = route.cache
        assert options is not None  # build_layer builds a cache only for a route with one
        self.next = next_handler
        self.route_name: str = route.name
        self.route_timeout: float = route.timeout
        self.clock = ctx.clock
        # Wall-clock seconds = injected-clock seconds + offset (HTTP dates are wall clock).
        self.offset: float = time.time() - ctx.clock.now()
        self.store = store
        self.max_object_size: int = store_options.max_object_size
        self.query_mode: str = options.key.query
        self._query_as_is = self.query_mode == "as-is"
        self.key_headers = tuple(n.encode() for n in options.key.headers)
        self.default_ttl: float = options.default_ttl
        self.swr: float = options.stale_while_revalidate
        self.sie: float = options.stale_if_error
        self.coalesce_timeout: float = options.coalesce_timeout
        self.flights = Flights(ctx.clock, self.coalesce_timeout)
        self.hit_for_miss = HitForMiss(options.uncacheable_ttl)
        self.uncacheable_ttl: float = options.uncacheable_ttl
        # True when only the response itself could make it reusable (no route default TTL or stale windows).
        self.quick_pass = not (self.default_ttl > 0 or self.sie > 0 or self.swr > 0)
        self.max_request_sie: float = options.max_request_stale_if_error
        self.store_set_cookie: bool = options.set_cookie == "store"
        # Targeted cache-control fields (RFC 9213), obeyed before Cache-Control in this order; the
        # ones meant for Fender alone are removed from every response of this route.
        self.targets = tuple(n.encode() for n in options.targeted_fields)
        consumed = rfc.FOR_FENDER_ONLY.intersection(self.targets)
        self._consumed = consumed
        self._relevant = _CACHE_RELEVANT.union(self.targets)
        # Purge by tag: the header naming the response's tags (lower-case), None when off.
        tag = options.tag_header.lower().encode() if options.tag_header else None
        self.tag_header = tag
        self._strip_tags = tag is not None and not options.forward_tag_header
        self._stripped_tag = tag if self._strip_tags else None
        # The fields addressed to Fender alone, removed in one scan on the paths that store nothing.
        self._fender_only = consumed.union((tag,)) if self._strip_tags else consumed
        self._tag_only = frozenset((tag,)) if self._strip_tags else frozenset()
        # Every response field the cache looks at, for the one scan of an upstream answer.
        self._watched = self._relevant.union((tag,)) if tag is not None else self._relevant
        # What finding the tag header means beyond its tags: nothing when it is removed at once,
        # else what its name is anyway (a tag header named like a relevant or consumed field).
        self._tag_found = 0
        if tag is not None and not self._strip_tags:
            self._tag_found = (RELEVANT if tag in self._relevant else 0) | (
                CONSUMED if tag in consumed else 0
            )
        self._tasks: set[asyncio.Task[Any]] = set()
        self.refreshing: set[bytes] = set()  # keys with a background refresh running
        m = ctx.metrics
        self.m_result = {r: FastCounter(m.cache_requests.labels(route.name, r)) for r in RESULTS}
        self.m_stale = {r: m.cache_stale_served.labels(route.name, r) for r in STALE_REASONS}
        self.m_reval = {r: m.cache_revalidations.labels(route.name, r) for r in REVALIDATION_RESULTS}
        self.m_coalesced = m.cache_coalesced.labels(route.name)
        hit_for_miss = self.hit_for_miss
        m.cache_uncacheable_keys.labels(route.name).set_function(lambda: len(hit_for_miss))
        # Fleet mode (state.backend: redis): Redis is the second tier (L2), shared by every sidecar.
        self.fleet = FleetTier(l2, store, self.offset, self.coalesce_timeout) if l2 is not None else None

    def key(self, host: bytes | None, target: bytes) -> bytes:
        if self._query_as_is:
            return (host.lower() if host else b"") + target
        return (host.lower() if host else b"") + rfc.normalise_query(target, self.query_mode)

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run ``coro`` in the background, held until it ends (background refreshes)."""
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ------------------------------------------------------------------ the Fender-only fields

    def scan(self, headers: list[tuple[bytes, bytes]]) -> tuple[int, list[bytes] | None]:
        """One pass over an upstream answer's fields: what it carries (RELEVANT | CONSUMED bits)
        and the values of the tag header (None when absent or tags are off)."""
        watched = self._watched
        found = 0
        values: list[bytes] | None = None
        tag = self.tag_header
        for name, value in headers:
            if name in watched:
                if name == tag:
                    if values is None:
                        values = []
                    values.append(value)
                    found |= self._tag_found
                else:
                    found |= RELEVANT
                    if name in self._consumed:
                        found |= CONSUMED
        return found, values

    def drop_tag_header(self, reply: Reply) -> None:
        """Remove the tag header (scan found it and forward_tag_header is off)."""
        name = self._stripped_tag
        if name is not None:
            reply.headers = [h for h in reply.headers if h[0] != name]

    def strip_consumed(self, reply: Reply) -> None:
        """Remove the targeted fields for Fender alone (Surrogate-Control, Fender-Cache-Control)."""
        consumed = self._consumed
        reply.headers = [h for h in reply.headers if h[0] not in consumed]

    def strip_fender_only(self, reply: Reply) -> None:
        """On a path that stores nothing: remove in one scan the targeted fields for Fender alone
        and, unless forward_tag_header, the tag header. (A reply of Fender's own holds no targeted
        fields; only the tag header is looked for there.)"""
        names = self._tag_only if isinstance(reply, LocalReply) else self._fender_only
        if names:
            headers = reply.headers
            for name, _ in headers:
                if name in names:
                    reply.headers = [h for h in headers if h[0] not in names]
                    return

    # ------------------------------------------------------------------ storing

    def vary_of(self, analysis: rfc.Analysis) -> tuple[bytes, ...]:
        names = self.key_headers + (analysis.vary or ())
        return tuple(dict.fromkeys(names))

    def entry(
        self,
        status: int,
        analysis: rfc.Analysis,
        body: bytes,
        ex: Exchange,
        now: float,
        like: Entry | None = None,
    ) -> Entry | None:
        """The entry to store; ``like``: the stored variant it updates, when not this request's own
        (keeps that variant's selection; None if the update changed its Vary)."""
        vary = self.vary_of(analysis)
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

    def entry_from(
        self,
        status: int,
        headers: list[tuple[bytes, bytes]],
        body: bytes,
        ex: Exchange,
        req: Request,
        request_time: float,
        now: float,
        like: Entry | None = None,
    ) -> Entry | None:
        """The entry for a stored response updated by a 304 or HEAD (analysed again), or None."""
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
        return self.entry(status, analysis, body, ex, now, like)

    def update_fields(self, headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
        """The fields of a 304 or HEAD response that go into a stored response (3.2).

        Without set_cookie: store, its Set-Cookie is for the client that asked, never stored.
        """
        if self.store_set_cookie:
            return headers
        return [h for h in headers if h[0] not in rfc.SET_COOKIE]

    def put(self, key: bytes, entry: Entry) -> None:
        """Store ``entry`` as its variant of ``key`` (in L1, and in L2 in the background)."""
        variants = self.store.get(key)
        value = variants.with_entry(entry) if variants is not None else Variants([entry])
        self.store.put(key, value)
        if self.fleet is not None:
            self.fleet.put(key, value, self.clock.now())

    def drop(self, keys: list[bytes]) -> None:
        """Delete ``keys`` here, and in the fleet in the background."""
        for key in keys:
            self.store.delete(key)
        if self.fleet is not None:
            self.fleet.invalidate_soon(keys)
