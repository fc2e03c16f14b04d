"""stale-while-revalidate (RFC 5861 3): a stale entry is served while one background request
per key revalidates it; the refresh answers no client and a failed one leaves the entry."""

from __future__ import annotations

import logging

from proxy.kernel.exchange import Exchange
from proxy.policies.cache.replies import fetch
from proxy.policies.cache.request import Request
from proxy.policies.cache.route import RouteCache, no_release
from proxy.policies.cache.store import Entry

log = logging.getLogger("fender.cache")


def refresh_in_background(c: RouteCache, ex: Exchange, key: bytes, entry: Entry) -> None:
    """Revalidate ``entry`` in the background unless a refresh of ``key`` is already running."""
    if key in c.refreshing:
        return
    c.refreshing.add(key)
    c.spawn(_refresh(c, _refresh_exchange(ex, c.clock.now() + c.route_timeout), key, entry))


def _refresh_exchange(ex: Exchange, deadline: float) -> Exchange:
    """The Exchange of a background refresh: a GET for the same target, without a body, with
    its own copy of the upstream headers (the refresh rewrites them) and its own deadline,
    sharing the client's request headers (read only). The one place the cache copies an
    Exchange; Exchange.for_attempt() (issue 18, proxy/kernel/exchange.py) is to replace it."""
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
        deadline,
    )
    refresh.upstream_target = ex.upstream_target
    return refresh


async def _refresh(c: RouteCache, ex: Exchange, key: bytes, entry: Entry) -> None:
    try:
        reply = await fetch(
            c,
            ex,
            key=key,
            stale=entry,
            req=Request(ex.request_headers),
            release=no_release,
            fwd=b"stale",
            count=False,
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
        c.refreshing.discard(key)
