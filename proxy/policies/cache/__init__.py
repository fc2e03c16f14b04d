"""Shared HTTP response cache (RFC 9111, RFC 5861 stale-*, RFC 9211 Cache-Status).

- ``options.py``: the route's ``cache:`` section and the top-level store section;
- ``policy.py``: RFC 9111 rules as pure functions (storability, freshness, age, Vary, validators);
- ``store.py``: the store interface and the in-memory LRU store bounded by bytes;
- ``purge.py``: purges of the in-memory store by prefix and by tag, and a response's tags;
- ``layer.py``: the pipeline layer (lookup, coalescing, revalidation, stale serving, storing).
"""
