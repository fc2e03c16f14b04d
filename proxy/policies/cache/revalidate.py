"""Revalidation: what a 304 to the cache's conditional request (RFC 9111 4.3.3, 4.3.4) and a
HEAD response (4.3.5) change in the stored responses of a URL."""

from __future__ import annotations

import copy
from typing import Any

from proxy.kernel.exchange import Exchange
from proxy.policies.cache import rfc9111 as rfc
from proxy.policies.cache.request import Request
from proxy.policies.cache.route import RouteCache
from proxy.policies.cache.store import Entry, Variants


def not_modified(
    c: RouteCache,
    ex: Exchange,
    fresh_headers: list[tuple[bytes, bytes]],
    *,
    key: bytes,
    stale: Entry,
    req: Request,
    request_time: float,
    tags: tuple[bytes, ...],
    now: float,
) -> Entry | None:
    """Update the stored response(s) a 304 with ``fresh_headers`` selects: the entry ``stale``
    became (to serve), or None when the 304 selects no stored response for this request."""
    variants = c.store.get(key)
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
    update = c.update_fields(fresh_headers)
    ages = [h for h in fresh_headers if h[0] == b"age"]  # for the new entry's age (4.2.3)
    served = None
    for i in chosen:
        e = entries[i]
        merged = rfc.merge_304(e.headers + e.held, update) + ages
        like = None if e is stale else e
        new = c.entry_from(e.status, merged, e.body, ex, req, request_time, now, like)
        if new is not None:
            new.tags = tags or e.tags  # a 304 without the tag header keeps the entry's tags
            c.put(key, new)
        if e is stale:
            served = new if new is not None else stale
    return served


def freshen_from_head(
    c: RouteCache, ex: Exchange, key: bytes, req: Request, reply: Any, request_time: float
) -> None:
    """RFC 9111 4.3.5: a HEAD 200 updates each stored GET response this request could have
    chosen when the validators (and Content-Length) match, and makes it stale otherwise."""
    variants = c.store.get(key)
    if variants is None:
        return
    now = c.clock.now()
    headers = reply.headers
    update = c.update_fields(headers)
    ages = [h for h in headers if h[0] == b"age"]
    for e in list(variants.entries):
        if Variants([e]).select(ex.request_headers) is None:
            continue
        new = None
        if rfc.head_matches(e.etag, e.last_modified, len(e.body), headers):
            merged = rfc.merge_304(e.headers + e.held, update) + ages
            new = c.entry_from(e.status, merged, e.body, ex, req, request_time, now)
        if new is None:
            new = copy.copy(e)
            new.fresh_until = min(e.fresh_until, now)
            new.stale_while_revalidate_until = min(e.stale_while_revalidate_until, now)
            c.m_reval["head_stale"].inc()
        else:
            c.m_reval["head_updated"].inc()
        c.put(key, new)
