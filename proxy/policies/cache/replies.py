"""The answers the cache gives: a stored response (hit, stale, 304), or the upstream's
answer to the cache's own request, stored on its way to the client when it may be.

:func:`serve` builds a reply from a stored entry; :func:`fetch` sends the
cache's request upstream and :func:`answer` decides what the upstream's reply
becomes: a stale entry on error (stale-if-error), a revalidated entry on 304
(revalidate.py updates the store), a stored response (tee-ing the body while
it streams, up to max_object_size), or the reply passed through.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from proxy.kernel.exchange import Exchange, LocalReply, Reply
from proxy.policies.cache import rfc9111 as rfc
from proxy.policies.cache.purge import tags_of
from proxy.policies.cache.request import Request, forwarded_headers
from proxy.policies.cache.revalidate import not_modified
from proxy.policies.cache.route import CONSUMED, RELEVANT, RouteCache
from proxy.policies.cache.store import Entry

# Framing of the upstream's message; a reply built by the cache sets its own Content-Length.
_FRAMING = frozenset({b"content-length", b"transfer-encoding"})
# Why the upstream forbids storing: a stored response of that URL is dropped (never the request's reasons).
_RESPONSE_SAYS_DO_NOT_STORE = frozenset({"no-store", "private", "vary", "must-understand"})

STATUS_MISS = b"fender; fwd=miss"
STATUS_BYPASS = b"fender; fwd=bypass"
_MISS_STATUS = {
    status: b"fender; fwd=miss; fwd-status=%d" % status for status in (200, 201, 204, 301, 302, 304, 404)
}


def miss_status(status: int) -> bytes:
    """Cache-Status of a plain miss answered ``status`` by the upstream (prebuilt for the usual ones)."""
    return _MISS_STATUS.get(status) or b"fender; fwd=miss; fwd-status=%d" % status


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

    def __init__(self, reply: Reply, prefix: bytes) -> None:
        self.status = reply.status
        self.headers = reply.headers
        self._reply = reply
        self._prefix = prefix

    @property
    def complete(self) -> bool:
        return self._reply.complete

    @property
    def trailers(self) -> list[tuple[bytes, bytes]] | None:
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

    def __init__(self, reply: Reply, limit: int, on_done: Callable[[bytes | None], None]) -> None:
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
    def trailers(self) -> list[tuple[bytes, bytes]] | None:
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


# --------------------------------------------------------------------------- from the store


def serve(ex: Exchange, entry: Entry, req: Request, now: float, status: bytes) -> CachedReply:
    """A stored response for this client: Age and Cache-Status ``status`` added, a 304 when the
    client's conditionals match it, no body for HEAD. (Positional: it is the hit path.)"""
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


def hit_status(entry: Entry, now: float) -> bytes:
    return b"fender; hit; ttl=%d" % int(entry.fresh_until - now)


# --------------------------------------------------------------------------- from the upstream


async def fetch(
    c: RouteCache,
    ex: Exchange,
    *,
    key: bytes,
    stale: Entry | None,
    req: Request,
    release: Callable[[], None],
    fwd: bytes,
    count: bool = True,
) -> Any:
    """Send the cache's request upstream (revalidating ``stale`` when given), store what may be
    stored, answer the client. ``count`` is False for background refreshes, which answer no client."""
    request_time = c.clock.now()
    ex.headers = forwarded_headers(ex.headers, stale)
    reply = await c.next(ex)
    return await answer(
        c,
        ex,
        reply,
        key=key,
        stale=stale,
        req=req,
        release=release,
        fwd=fwd,
        count=count,
        request_time=request_time,
    )


def _client_accepts_stale(c: RouteCache, req: Request, stale: Entry, now: float) -> bool:
    """The request's own stale-if-error (RFC 5861 4), bounded by max_request_stale_if_error."""
    d = req.directives
    if d is None or not d.stale_if_error or stale.no_stale:
        return False
    return now - stale.fresh_until <= min(d.stale_if_error, c.max_request_sie)


async def answer(
    c: RouteCache,
    ex: Exchange,
    reply: Any,
    *,
    key: bytes,
    stale: Entry | None,
    req: Request,
    release: Callable[[], None],
    fwd: bytes,
    count: bool,
    request_time: float,
) -> Any:
    """What the cache does with the upstream's ``reply`` to its request: serve ``stale`` on error,
    merge a 304 into it, store a storable response, answer the client.

    ``release`` wakes the misses coalesced behind this one (once the outcome is stored or known
    not to be); ``fwd`` is Cache-Status's fwd parameter; ``count`` counts the request's result.
    """
    now = c.clock.now()
    local = isinstance(reply, LocalReply)
    found = 0
    tags: tuple[bytes, ...] = ()
    if local:
        failed = True
    else:
        failed = reply.status >= 500
        # One scan for every field the cache acts on (cache-relevant, Fender-only, the tag header).
        found, values = c.scan(reply.headers)
        if values is not None:
            c.drop_tag_header(reply)
            tags = tags_of(values)
    if stale is not None:
        if failed:
            c.m_reval["failed"].inc()
            if now < stale.stale_if_error_until or _client_accepts_stale(c, req, stale, now):
                release()
                reply.close()
                if count:
                    c.m_result["stale"].inc()
                    c.m_stale["stale_if_error"].inc()
                status = b"fender; fwd=stale; fwd-status=%d; detail=stale-if-error" % reply.status
                return serve(ex, stale, req, now, status)
        elif reply.status == 304:
            return await _not_modified(
                c,
                ex,
                reply,
                key=key,
                stale=stale,
                req=req,
                release=release,
                fwd=fwd,
                count=count,
                request_time=request_time,
                tags=tags,
            )
        else:
            c.m_reval["modified"].inc()
        if count:
            c.m_result["miss"].inc()
    if failed and (stale is not None or local):
        # Fender's own fault replies are never stored, nor does an upstream error replace a stored response.
        release()
        if found & CONSUMED:
            c.strip_consumed(reply)
        ex.response_headers.append((b"cache-status", b"fender; fwd=%s; fwd-status=%d" % (fwd, reply.status)))
        return reply
    if c.quick_pass and not failed and not found & RELEVANT:
        # No freshness, validators or Vary, and the route grants no default TTL or stale
        # window: nothing here could be reused, so skip the full RFC 9111 analysis.
        release()
        if c.uncacheable_ttl > 0:
            c.hit_for_miss.remember(key, now)
        ex.response_headers.append((b"cache-status", b"fender; fwd=%s; fwd-status=%d" % (fwd, reply.status)))
        return reply
    analysis = rfc.analyse(
        reply.status,
        reply.headers,
        request_authorized=req.authorized,
        request_no_store=req.directives is not None and req.directives.no_store,
        request_time=request_time + c.offset,
        response_time=now + c.offset,
        default_ttl=c.default_ttl,
        store_set_cookie=c.store_set_cookie,
        targets=c.targets,
    )
    if found & CONSUMED:
        c.strip_consumed(reply)
    if (
        not analysis.storable
        or not rfc.worth_storing(analysis, c.sie, c.swr)
        or (failed and not analysis.explicit)
    ):
        # (A 5xx is stored only when the upstream gave it explicit freshness.)
        release()
        if not failed and c.uncacheable_ttl > 0:
            c.hit_for_miss.remember(key, now)
        if stale is not None and analysis.why_not in _RESPONSE_SAYS_DO_NOT_STORE:
            # The upstream now forbids storing this URL: drop what we have. (Reasons coming
            # from the request, like its no-store or Authorization, must not let a client purge.)
            c.drop([key])
        ex.response_headers.append((b"cache-status", b"fender; fwd=%s; fwd-status=%d" % (fwd, reply.status)))
        return reply
    length = rfc.combined(reply.headers, b"content-length")
    if length is not None and length.isdigit() and int(length) > c.max_object_size:
        release()
        ex.response_headers.append(
            (b"cache-status", b"fender; fwd=%s; fwd-status=%d; detail=too-big" % (fwd, reply.status))
        )
        return reply
    status_value = b"fender; fwd=%s; fwd-status=%d; stored" % (fwd, reply.status)

    if c.hit_for_miss.table:
        c.hit_for_miss.table.pop(key, None)

    def store(body: bytes | None) -> None:
        try:
            if body is not None:
                entry = c.entry(reply.status, analysis, body, ex, now)
                assert entry is not None  # this request's own variant always has one
                entry.tags = tags
                c.put(key, entry)
        finally:
            release()

    if not reply.has_body():
        store(b"")
        reply.close()
        ex.response_headers.append((b"cache-status", status_value))
        return _whole(reply.status, reply.headers, b"", req, analysis)
    if req.conditional:
        # Read the body here: the client may get a 304 built from it.
        return await _read_then_answer(
            c, ex, reply, req=req, analysis=analysis, store=store, status_value=status_value
        )
    ex.response_headers.append((b"cache-status", status_value))
    return StoringReply(reply, c.max_object_size, store)


async def _read_then_answer(
    c: RouteCache,
    ex: Exchange,
    reply: Any,
    *,
    req: Request,
    analysis: rfc.Analysis,
    store: Callable[[bytes | None], None],
    status_value: bytes,
) -> Any:
    parts: list[bytes] = []
    size = 0
    try:
        while True:
            chunk = await reply.read()
            if not chunk:
                break
            parts.append(chunk)
            size += len(chunk)
            if size > c.max_object_size:
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
    return _whole(reply.status, reply.headers, body, req, analysis)


def _whole(
    status: int, headers: list[tuple[bytes, bytes]], body: bytes, req: Request, analysis: rfc.Analysis
) -> CachedReply:
    """The upstream's response, read whole, as a reply: a 304 when the client's conditionals match."""
    headers = [h for h in headers if h[0] not in _FRAMING]
    if (
        req.conditional
        and 200 <= status < 300
        and rfc.not_modified(
            req.if_none_match, req.if_modified_since, analysis.etag, analysis.last_modified, analysis.date
        )
    ):
        return CachedReply(304, rfc.not_modified_headers(headers), b"")
    return CachedReply(status, headers + [(b"content-length", b"%d" % len(body))], body)


async def _not_modified(
    c: RouteCache,
    ex: Exchange,
    reply: Any,
    *,
    key: bytes,
    stale: Entry,
    req: Request,
    release: Callable[[], None],
    fwd: bytes,
    count: bool,
    request_time: float,
    tags: tuple[bytes, ...],
) -> Any:
    """A 304 to the cache's own conditional request: the stored response(s) it selects updated
    (revalidate.py), ``stale`` served revalidated, or the request asked again when none is."""
    fresh_headers = reply.headers
    reply.close()
    now = c.clock.now()
    served = not_modified(
        c, ex, fresh_headers, key=key, stale=stale, req=req, request_time=request_time, tags=tags, now=now
    )
    if served is None:
        # RFC 9111 4.3.4: a 304 that selects no stored response (e.g. a new strong ETag) updates
        # nothing and cannot answer this request: ask again, unconditionally.
        c.m_reval["unselected"].inc()
        if count:
            c.m_result["miss"].inc()
        ex.headers = forwarded_headers(ex.headers, None)
        request_time = c.clock.now()
        reply = await c.next(ex)
        return await answer(
            c,
            ex,
            reply,
            key=key,
            stale=None,
            req=req,
            release=release,
            fwd=fwd,
            count=False,
            request_time=request_time,
        )
    c.m_reval["not_modified"].inc()
    if count:
        c.m_result["revalidated"].inc()
    release()
    served_reply = serve(ex, served, req, now, b"fender; fwd=stale; fwd-status=304")
    if served.held:
        # Just revalidated: the no-cache="..." fields may go to this client (RFC 9111 5.2.2.4).
        full = served.validated_headers()
        served_reply.headers = rfc.not_modified_headers(full) if served_reply.status == 304 else full
    if not c.store_set_cookie:
        cookies = [h for h in fresh_headers if h[0] in rfc.SET_COOKIE]
        if cookies:
            # The 304 answered this client's request: its cookies are for this client only.
            served_reply.headers = served_reply.headers + cookies
    return served_reply
