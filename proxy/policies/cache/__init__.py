"""Shared HTTP response cache (RFC 9111, RFC 5861 stale-*, RFC 9211 Cache-Status).

- ``options.py``: the route's ``cache:`` section and the top-level store section;
- ``rfc9111.py``: RFC 9111 rules as pure functions (storability, freshness, age, Vary, validators);
- ``store.py``: the stored responses (Entry, Variants) and the in-memory LRU store bounded by bytes;
- ``codec.py``: the versioned, length- and checksum-checked format of stored responses in Redis;
- ``request.py``: what the client's headers say to the cache (one scan);
- ``fleet.py``: the second tier in fleet mode (L2 reads, writes and invalidations over Redis);
- ``coalesce.py``: request coalescing (local flights, hit-for-miss) and what a coalesced miss is served;
- ``route.py``: one route's cache settings, metrics, store and tiers; the steps of storing;
- ``revalidate.py``: what a 304 or a HEAD response changes in the store;
- ``replies.py``: the answers (hit, stale, 304 from the store; the upstream's reply, stored on its way);
- ``refresh.py``: background refreshes (stale-while-revalidate);
- ``purge.py``: purges of the in-memory store by prefix and by tag, and a response's tags;
- ``layer.py``: the pipeline layer (which of those a request gets).
"""
