"""The cache's verdict on one request, read back from the Cache-Status field it added (RFC 9211).

Used by the access log and by tracing, in the words of fender_cache_requests_total's result label.
"""

from __future__ import annotations


def cache_result(headers: list[tuple[bytes, bytes]]) -> str | None:
    """The cache's verdict from the Cache-Status the cache layer added, in the words of
    fender_cache_requests_total's result label; None when no cache was on the route."""
    for name, value in headers:
        if name == b"cache-status":
            return _result(value)
    return None


def _result(value: bytes) -> str:
    params = [p.strip() for p in value.split(b";")[1:]]
    first = params[0] if params else b""
    if first == b"hit":
        if any(p.startswith(b"detail=coalesced") for p in params):
            return "coalesced"
        return "stale" if any(p.startswith(b"ttl=-") for p in params) else "hit"
    if first == b"fwd=stale":
        if b"fwd-status=304" in params:
            return "revalidated"
        return "stale" if b"detail=stale-if-error" in params else "miss"
    if first == b"fwd=bypass":
        return "bypass"
    if b"detail=only-if-cached" in params:
        return "only_if_cached"
    return "miss"
