"""The cache's second tier in fleet mode (``state.backend: redis``): reads, writes and
invalidations of the copies in Redis that every sidecar shares.

Redis failing or slow is a miss, never an error: reads that fail return None,
writes go in the background, and an invalidation that fails leaves L1 purged.
The Redis client itself (timeouts, its breaker, pub/sub) is proxy/state/redis.py.
"""

from __future__ import annotations

import asyncio
from typing import Any

from proxy.policies.cache import codec
from proxy.policies.cache.store import MemoryStore, Variants
from proxy.state.redis import RedisState, RedisUnavailable


class FleetTier:
    """L2 for one route's cache layer: the shared Redis copy of the L1 store."""

    __slots__ = ("l2", "store", "offset", "m_l1", "m_l2", "wait", "locked", "_tasks")

    def __init__(self, l2: RedisState, store: MemoryStore, offset: float, coalesce_timeout: float) -> None:
        l2.attach(store)
        self.l2 = l2
        self.store = store
        self.offset = offset  # wall clock - the layer's clock (the blobs hold wall-clock times)
        self.m_l1 = l2.m_tier["l1"]
        self.m_l2 = l2.m_tier["l2"]
        # How long a miss waits for the sidecar holding the key's fleet lock (0: never waits).
        self.wait: float = min(coalesce_timeout, l2.options.lock_ttl)
        # Keys whose fleet lock this layer holds (bounded by the flights in progress).
        self.locked: set[bytes] = set()
        self._tasks: set[asyncio.Task[Any]] = set()

    async def get(self, key: bytes) -> Variants | None:
        """L1 missed: read the fleet's copy. Redis failing or slow is a miss, never an error."""
        try:
            blob = await self.l2.get_blob(key)
        except RedisUnavailable:
            return None
        if blob is None:
            return None
        return await self.accept(key, blob)

    async def accept(self, key: bytes, blob: bytes) -> Variants | None:
        """A blob read from Redis, decoded into L1; None (and deleted from Redis) when unreadable."""
        variants = codec.decode(blob, self.offset)
        if variants is None:
            await self.l2.invalid(key)  # unreadable: deleted, never served
            return None
        self.m_l2.inc()
        self.store.put(key, variants)
        return variants

    async def try_lock(self, key: bytes) -> bool:
        """The key's fleet lock (this sidecar fetches it for the fleet); False: another holds it."""
        if await self.l2.try_lock(key):
            self.locked.add(key)
            return True
        return False

    def unlock(self, key: bytes) -> None:
        """Nothing was stored (not storable, an error, too big): free the fleet's waiters now."""
        if key in self.locked:
            self.locked.discard(key)
            self.l2.unlock(key)

    async def poll(self, key: bytes, clock: Any) -> Variants | None:
        """Wait for the sidecar holding ``key``'s lock to store the response in L2 (at most
        ``wait`` on the injected clock): the Variants it stored, or None to go upstream."""
        deadline = clock.now() + self.wait
        delay = 0.005
        while clock.now() < deadline and not self.l2.breaker.is_open:
            await clock.sleep(min(delay, max(deadline - clock.now(), 0.0)))
            delay = min(delay * 2, 0.05)
            try:
                blob, locked = await self.l2.poll(key)
            except RedisUnavailable:
                return None
            if blob is None:
                if locked:
                    continue
                return None  # the holder stored nothing (or gave up): go upstream
            return await self.accept(key, blob)
        return None

    def put(self, key: bytes, value: Variants, now: float) -> None:
        """Write what L1 just stored, in the background; the write releases the fleet lock with it."""
        self.locked.discard(key)
        # Kept in Redis until the last stale window ends.
        ttl = codec.expiry(value, now)
        if ttl > 0:
            tags = {t for e in value.entries for t in e.tags}
            self.l2.put_blob(key, codec.encode(value, self.offset), int(ttl * 1000) + 1, tags)

    async def invalidate(self, keys: list[bytes]) -> None:
        """Delete ``keys`` in Redis and tell every sidecar (at most state.redis.timeout; on failure, L1 only)."""
        await self.l2.invalidate(keys)

    def invalidate_soon(self, keys: list[bytes]) -> None:
        """``invalidate`` in the background (nobody waits for it)."""
        task = asyncio.ensure_future(self.l2.invalidate(keys))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
