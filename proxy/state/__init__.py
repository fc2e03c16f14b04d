"""Shared state for a fleet of sidecars (issue 10).

- ``options.py``: the top-level ``state:`` section (backend memory | redis);
- ``redis.py``: the Redis client wrapper (one per Fender): timeouts, its own
  breaker, metrics, pub/sub invalidations;
- ``ratelimit.py``: global rate limits (one atomic Lua GCRA script per decision).
"""

from __future__ import annotations
