"""Shared HTTP response cache (RFC 9111, RFC 5861 stale-*, RFC 9211 Cache-Status).

- ``options.py``: the route's ``cache:`` section and the top-level store section;
- ``policy.py``: RFC 9111 rules as pure functions (storability, freshness, age, Vary, validators);
- ``store.py``: the store interface and the in-memory LRU store bounded by bytes;
- ``purge.py``: purges of the in-memory store by prefix and by tag, and a response's tags;
- ``layer.py``: the pipeline layer (lookup, coalescing, revalidation, stale serving, storing).
"""

from __future__ import annotations


def build_layer(route, next_handler, ctx):
    """The cache layer for ``route``, or None when the route has no enabled ``cache:`` section."""
    from proxy.resilience.cache.layer import build_layer as build

    return build(route, next_handler, ctx)
