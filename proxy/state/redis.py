"""The Redis client wrapper: one per Fender, shared by the cache tier and global rate limits.

Every call runs under ``asyncio.timeout(options.timeout)`` and through a small
consecutive-failure breaker of its own: after ``failure_threshold`` failed
calls in a row no call is attempted for ``open_for`` (callers fall back at
once: cache L1 only, rate limits per ``on_failure``); then one trial call is
let through, and its success closes the breaker. So a slow or dead Redis
adds at most ``timeout`` per call to the first few requests, until the
breaker opens, and nothing after that.

Invalidations travel on one pub/sub channel (``<key_prefix>inv``). A
background task keeps the subscription; every message names a cache key,
which is dropped from this sidecar's L1 store(s). Purges by tag and by prefix
travel on a second channel (``<key_prefix>purge``): each sidecar drops what
its own L1 holds that matches; the purging sidecar deletes the matching L2
values, found through two bounded indexes kept beside them (see
:meth:`RedisState.purge`). A subscription that is
established again after being lost clears L1 entirely: messages sent while it
was down are gone.

On a Redis Cluster the two channels are sharded (``<key_prefix>{inv}`` and
``<key_prefix>{inv}purge``, one hash slot: SPUBLISH/SSUBSCRIBE) when the node
serving that slot is 7.0 or later (``state.redis.pubsub``): only that slot's
master and replicas carry them, where a plain PUBLISH is copied by the cluster
bus to every node. The subscription follows the slot: when its node dies or
gives the slot up (a failover; Redis then ends the subscription with
SUNSUBSCRIBE), the listener reloads the slot map and subscribes again on the
slot's new master.

The object is built through the runtime's hand-over (``ctx.keep``) under
:data:`STATE_KEY` with the ``state.redis`` options as settings, so a reload
that leaves those options unchanged keeps the same client, connections and
subscription; it is also exposed as ``state/redis`` for the admin
API.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import weakref
from collections.abc import Iterator
from typing import Protocol
from urllib.parse import unquote, urlsplit

from proxy.state.keys import target_of
from proxy.state.options import RedisOptions

log = logging.getLogger("fender.state")

STATE_KEY = "state.redis"
OPS = ("ratelimit", "get", "set", "invalidate", "lock", "subscribe", "purge")
OUTCOMES = ("ok", "error", "timeout", "rejected", "invalid", "dropped")
# Background writes (L2 stores) pending at once, by count and by bytes; beyond either a write is
# skipped (the L1 copy stays), so a slow Redis cannot make Fender hold responses without bound.
MAX_PENDING_WRITES = 256
MAX_PENDING_BYTES = 32 * 1024 * 1024
# How long one get_message call waits before the listener loop checks whether it should stop.
LISTEN_POLL = 1.0
# The L2 indexes for purges: stored keys a tag set or the key index holds at most (the soonest to expire
# are forgotten beyond it), and L2 values one purge deletes at most. A purge may take this long.
MAX_INDEXED = 100_000
PURGE_TIMEOUT = 5.0
_DELETE_CHUNK = 1000

# The key index: every L2 key by its target (a sorted set of "target host" members, all scored 0, so a
# prefix is a ZRANGEBYLEX) and by its expiry (a sorted set scored by wall-clock ms). Both keys share a
# hash tag: one Cluster slot. Drops up to 64 expired members per call, and the soonest to expire beyond
# MAX_INDEXED. KEYS: by-target, by-expiry. ARGV: member, expiry ms, now ms, MAX_INDEXED.
INDEX_LUA = """
local old = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', ARGV[3], 'LIMIT', 0, 64)
for _, m in ipairs(old) do
  redis.call('ZREM', KEYS[1], m)
  redis.call('ZREM', KEYS[2], m)
end
redis.call('ZADD', KEYS[1], 0, ARGV[1])
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
local over = redis.call('ZCARD', KEYS[2]) - tonumber(ARGV[4])
if over > 0 then
  for _, m in ipairs(redis.call('ZPOPMIN', KEYS[2], over)) do redis.call('ZREM', KEYS[1], m) end
end
return 0
"""


class FleetListener(Protocol):
    """What the fleet tier needs from a sidecar's own store (the cache's L1, proxy/policies/cache)."""

    def delete(self, key: bytes) -> bool: ...
    def keys(self) -> Iterator[bytes]: ...
    def purge(self, kind: str, value: bytes) -> int:
        """Apply a purge another sidecar published (kind tag or prefix); the keys dropped."""
        ...


class _Lost(Exception):
    """The subscription ended without an error (a sharded channel's slot moved): subscribe again."""


class RedisUnavailable(Exception):
    """A Redis call failed, timed out, or was not attempted because the breaker is open."""


class RedisBreaker:
    """Consecutive-failure breaker with one trial call after ``open_for`` (injected clock)."""

    __slots__ = ("threshold", "open_for", "clock", "failures", "open_until", "trial", "on_change")

    def __init__(self, threshold: int, open_for: float, clock, on_change=None) -> None:
        self.threshold = threshold
        self.open_for = open_for
        self.clock = clock
        self.failures = 0
        self.open_until: float | None = None  # None: closed
        self.trial = False  # a trial call is in flight (half-open)
        self.on_change = on_change

    @property
    def is_open(self) -> bool:
        return self.open_until is not None

    def allow(self) -> bool:
        if self.open_until is None:
            return True
        if self.trial or self.clock.now() < self.open_until:
            return False
        self.trial = True
        return True

    def success(self) -> None:
        self.failures = 0
        self.trial = False
        if self.open_until is not None:
            self.open_until = None
            if self.on_change is not None:
                self.on_change(False)

    def failure(self) -> None:
        self.failures += 1
        was_open = self.open_until is not None
        if was_open or self.failures >= self.threshold:
            self.trial = False
            self.open_until = self.clock.now() + self.open_for
            if not was_open and self.on_change is not None:
                self.on_change(True)


def _load_redis():
    try:
        import redis.asyncio as aioredis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff
        from redis.exceptions import RedisClusterException, RedisError
    except ImportError as exc:  # pragma: no cover - depends on the installation
        raise RuntimeError(
            "state.backend: redis needs the redis package: pip install 'fender[redis]'"
        ) from exc
    return aioredis, Retry, NoBackoff, (RedisError, RedisClusterException)


class RedisState:
    """One Fender's connection to the fleet's Redis."""

    def __init__(self, options: RedisOptions, metrics, clock) -> None:
        aioredis, Retry, NoBackoff, redis_errors = _load_redis()
        self.options = options
        self.clock = clock
        self.timeout = options.timeout
        self.prefix = options.key_prefix.encode()
        self.channel = self.prefix + b"inv"
        self.purge_channel = self.prefix + b"purge"
        # Sharded pub/sub (cluster): both channels in one hash slot, so one subscription carries them.
        self.shard_channels = {
            self.channel: self.prefix + b"{inv}",
            self.purge_channel: self.prefix + b"{inv}purge",
        }
        # Decided at every (re)subscription in cluster mode (_sharded_pubsub).
        self.sharded = options.mode == "cluster" and options.pubsub == "sharded"
        self.index_keys = [self.prefix + b"{idx}:target", self.prefix + b"{idx}:expiry"]
        self.lock_ttl_ms = int(options.lock_ttl * 1000)
        # Messages carry the sender's id, so a sidecar does not count its own invalidations as received.
        self.origin = os.urandom(8).hex().encode()
        self._errors = (*redis_errors, OSError)
        # A Cluster pipeline refuses PUBLISH (no key, no slot): messages then go as calls of their own.
        self._publish_apart = options.mode == "cluster"
        self.client = _client(options, aioredis, Retry, NoBackoff)
        self.metrics = metrics
        self.m_calls = {(op, out): metrics.redis_calls.labels(op, out) for op in OPS for out in OUTCOMES}
        self.m_duration = {op: metrics.redis_call_duration.labels(op) for op in OPS}
        self.m_tier = {t: metrics.cache_tier_hits.labels(t) for t in ("l1", "l2")}
        self.m_sent = metrics.cache_invalidations.labels("sent")
        self.m_received = metrics.cache_invalidations.labels("received")
        self.m_fallback = metrics.redis_fallback
        self.m_purges = metrics.cache_purges
        self.m_purged = metrics.cache_purged
        self.m_fallback.set(0)
        self.m_pubsub = {mode: metrics.redis_pubsub.labels(mode) for mode in ("plain", "sharded")}
        self.breaker = RedisBreaker(
            options.failure_threshold, options.open_for, clock, on_change=self._fallback_changed
        )
        # L1 stores (FleetListener) to drop invalidated keys from (weak: a reload may replace a store).
        self._stores: weakref.WeakSet[FleetListener] = weakref.WeakSet()
        self._writes: set[asyncio.Task] = set()
        self._pending_bytes = 0
        self._listener: asyncio.Task | None = None
        self._closed = False
        self.subscribed = asyncio.Event()
        self.subscriptions = 0  # successful (re)subscriptions, for the admin API and tests
        self.received = 0  # invalidations applied from other sidecars
        self.purges_received = 0  # purges by tag or prefix applied from other sidecars
        self._progress = asyncio.Condition()  # notified on (re)subscription and on received messages
        self.closed = asyncio.Event()
        self.l1_clears = 0
        self._scripts: dict[str, object] = {}

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        if self._listener is None and not self._closed:
            self._listener = asyncio.ensure_future(self._listen())

    async def close(self) -> None:
        self._closed = True
        self.closed.set()
        if self._listener is not None:
            self._listener.cancel()
            try:
                await self._listener
            except (asyncio.CancelledError, Exception):  # noqa: BLE001 - closing
                pass
            self._listener = None
        for task in list(self._writes):
            task.cancel()

        try:
            async with asyncio.timeout(1.0):
                # Let the cancelled writes give their connections back before the pool is closed
                # (else those connections are left open: a ResourceWarning when they are collected).
                await asyncio.gather(*self._writes, return_exceptions=True)
                # The client was given its pool, so it would not close it by itself (redis-py's
                # auto_close_connection_pool is off then): without this its sockets stayed open.
                await _close_client(self.client)
        except (TimeoutError, *self._errors):  # pragma: no cover - closing a dead connection
            pass

    def carry_over(self, old: RedisState) -> None:
        """Take over the L1 stores the previous client served (options changed on reload)."""
        for store in list(old._stores):
            self._stores.add(store)

    def _fallback_changed(self, fallback: bool) -> None:
        self.m_fallback.set(1 if fallback else 0)
        log.warning("redis %s", "unavailable: working without shared state" if fallback else "back")

    # ------------------------------------------------------------------ calls

    async def call(self, op: str, fn, *args, timeout: float | None = None, **kwargs):
        """``await fn(*args)`` within the timeout and the breaker; RedisUnavailable on any failure."""
        if not self.breaker.allow():
            self.m_calls[(op, "rejected")].inc()
            raise RedisUnavailable(op)
        started = time.perf_counter()
        try:
            async with asyncio.timeout(timeout or self.timeout):
                result = await fn(*args, **kwargs)
        except TimeoutError:
            self._failed(op, "timeout", started)
            raise RedisUnavailable(op) from None
        except self._errors as exc:
            self._failed(op, "error", started)
            raise RedisUnavailable(op) from exc
        except BaseException:
            # Cancelled by the caller: not Redis's fault, but let a half-open trial go again.
            self.breaker.trial = False
            raise
        self.m_duration[op].observe(time.perf_counter() - started)
        self.m_calls[(op, "ok")].inc()
        self.breaker.success()
        return result

    def _failed(self, op: str, outcome: str, started: float) -> None:
        self.m_duration[op].observe(time.perf_counter() - started)
        self.m_calls[(op, outcome)].inc()
        self.breaker.failure()

    def script(self, name: str, source: str):
        """A registered Lua script (EVALSHA, loading it again after a Redis restart)."""
        script = self._scripts.get(name)
        if script is None:
            script = self._scripts[name] = self.client.register_script(source)
        return script

    def background(self, op: str, coro_fn, *args, size: int = 0) -> None:
        """Run a call without anybody waiting for it (L2 stores); bounded in number and bytes."""
        if (
            len(self._writes) >= MAX_PENDING_WRITES
            or self._pending_bytes + size > MAX_PENDING_BYTES
            or self._closed
        ):
            self.m_calls[(op, "dropped")].inc()
            return
        self._pending_bytes += size
        task = asyncio.ensure_future(self._quiet(op, coro_fn, *args))
        self._writes.add(task)
        task.add_done_callback(lambda t: self._written(t, size))

    def _written(self, task: asyncio.Task, size: int) -> None:
        self._writes.discard(task)
        self._pending_bytes -= size

    async def flush(self) -> None:
        """Wait for the background writes pending now (tests; shutdown)."""
        pending = list(self._writes)
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)

    async def _quiet(self, op: str, coro_fn, *args) -> None:
        try:
            await self.call(op, coro_fn, *args)
        except RedisUnavailable:
            pass

    # ------------------------------------------------------------------ cache tier

    def attach(self, store: FleetListener) -> None:
        """Have invalidations and purges from the fleet reach ``store`` (an L1 store)."""
        self._stores.add(store)

    def cache_key(self, key: bytes) -> bytes:
        return self.prefix + b"c:" + key

    async def get_blob(self, key: bytes) -> bytes | None:
        return await self.call("get", self.client.get, self.cache_key(key))

    async def invalid(self, key: bytes) -> None:
        """A value failed its checks: count it and delete it (before this sidecar stores a new one)."""
        self.m_calls[("get", "invalid")].inc()
        try:
            await self.call("invalidate", self.client.delete, self.cache_key(key))
        except RedisUnavailable:
            pass

    def tag_key(self, tag: bytes) -> bytes:
        return self.prefix + b"t:" + tag

    def put_blob(self, key: bytes, blob: bytes, ttl_ms: int, tags=()) -> None:
        """Store ``blob`` with a TTL and release this sidecar's fleet lock on the key, in the background."""
        self.background("set", self._put, key, blob, ttl_ms, tags, size=len(blob))

    async def _put(self, key: bytes, blob: bytes, ttl_ms: int, tags) -> None:
        ttl_ms = max(1, ttl_ms)
        now_ms = int(time.time() * 1000)
        expiry_ms = now_ms + ttl_ms
        host, target = target_of(key)
        async with self.client.pipeline(transaction=False) as pipe:
            # One SET: Redis applies it whole or not at all, so no reader ever sees half a value.
            pipe.set(self.cache_key(key), blob, px=ttl_ms)
            pipe.delete(self.prefix + b"l:" + key)
            # EVAL (not EVALSHA) inside the pipeline: a Cluster pipeline cannot load scripts first.
            pipe.eval(INDEX_LUA, 2, *self.index_keys, target + b" " + host, expiry_ms, now_ms, MAX_INDEXED)
            for tag in tags:
                # A tag's set: its keys scored by expiry; the set lives as long as its longest-lived key.
                tag_key = self.tag_key(tag)
                pipe.zremrangebyscore(tag_key, "-inf", now_ms)
                pipe.zadd(tag_key, {key: expiry_ms})
                pipe.zremrangebyrank(tag_key, 0, -MAX_INDEXED - 1)
                pipe.pexpireat(tag_key, expiry_ms, nx=True)
                pipe.pexpireat(tag_key, expiry_ms, gt=True)
            await pipe.execute()

    async def try_lock(self, key: bytes) -> bool:
        """The fleet lock for fetching ``key``: True when this sidecar got it (or Redis cannot say)."""
        try:
            got = await self.call(
                "lock", self.client.set, self.prefix + b"l:" + key, self.origin, nx=True, px=self.lock_ttl_ms
            )
        except RedisUnavailable:
            return True
        return bool(got)

    def unlock(self, key: bytes) -> None:
        """Release this sidecar's fleet lock on ``key`` (in the background)."""
        self.background("lock", self.client.delete, self.prefix + b"l:" + key)

    async def poll(self, key: bytes) -> tuple[bytes | None, bool]:
        """A waiting sidecar's look: (the stored value or None, whether the lock is still held)."""

        async def run():
            async with self.client.pipeline(transaction=False) as pipe:
                pipe.get(self.cache_key(key))
                pipe.exists(self.prefix + b"l:" + key)
                return await pipe.execute()

        blob, locked = await self.call("get", run)
        return blob, bool(locked)

    async def invalidate(self, keys: list[bytes]) -> bool:
        """Delete ``keys`` from L2 and tell every sidecar to drop them from L1 (one round trip)."""
        if not keys:
            return True

        async def run() -> None:
            async with self.client.pipeline(transaction=False) as pipe:
                for k in keys:  # one key per DEL: in a Cluster the keys sit in different slots
                    pipe.delete(self.cache_key(k))
                messages = [self.origin + b" " + k for k in keys]
                self._publish(pipe, self.channel, messages)
                await pipe.execute()
            await self._publish_rest(self.channel, messages)

        try:
            await self.call("invalidate", run)
        except RedisUnavailable:
            return False
        self.m_sent.inc(len(keys))
        return True

    async def purge(self, kind: str, values: list[bytes]) -> int | None:
        """Drop what matches from L2 and publish the purge to every sidecar; the L2 values deleted.

        ``kind`` tag: ``values`` are tags, the L2 keys come from each tag's set. ``kind`` prefix:
        ``values`` are ``host + b" " + prefix`` (host empty: any host), the keys come from the key
        index (a range of targets). None when Redis failed (only this sidecar's L1 was purged).
        """
        now_ms = int(time.time() * 1000)

        async def run() -> int:
            async with self.client.pipeline(transaction=False) as pipe:
                for value in values:
                    if kind == "tag":
                        pipe.zrangebyscore(self.tag_key(value), now_ms, "+inf", start=0, num=MAX_INDEXED)
                    else:
                        prefix = value.partition(b" ")[2]
                        pipe.zrangebylex(
                            self.index_keys[0],
                            b"[" + prefix,
                            b"(" + prefix + b"\xff",
                            start=0,
                            num=MAX_INDEXED,
                        )
                found = await pipe.execute()
            keys: set[bytes] = set()
            members: list[bytes] = []
            for value, listed in zip(values, found, strict=True):
                if kind == "tag":
                    keys.update(listed)
                    continue
                host = value.partition(b" ")[0]
                for member in listed:
                    key_target, _, key_host = member.rpartition(b" ")
                    if not host or key_host == host:
                        keys.add(key_host + key_target)
                        members.append(member)
            keys_list = sorted(keys)[:MAX_INDEXED]
            async with self.client.pipeline(transaction=False) as pipe:
                for k in keys_list:  # one key per DEL: in a Cluster the keys sit in different slots
                    pipe.delete(self.cache_key(k))
                if kind == "tag":
                    for v in values:
                        pipe.delete(self.tag_key(v))
                for start in range(0, len(members), _DELETE_CHUNK):
                    chunk = members[start : start + _DELETE_CHUNK]
                    pipe.zrem(self.index_keys[0], *chunk)
                    pipe.zrem(self.index_keys[1], *chunk)
                messages = [b"%s %s %s" % (self.origin, kind.encode(), value) for value in values]
                self._publish(pipe, self.purge_channel, messages)
                done = await pipe.execute()
            await self._publish_rest(self.purge_channel, messages)
            return sum(done[: len(keys_list)])

        try:
            deleted = await self.call("purge", run, timeout=max(self.timeout, PURGE_TIMEOUT))
        except RedisUnavailable:
            return None
        self.m_purged.labels(kind, "l2").inc(deleted)
        return deleted

    # ------------------------------------------------------------------ pub/sub

    def _publish(self, pipe, channel: bytes, messages: list[bytes]) -> None:
        if self.sharded:
            # SPUBLISH names its channel as a key: the Cluster pipeline sends it to the slot's master.
            for message in messages:
                pipe.spublish(self.shard_channels[channel], message)
        elif not self._publish_apart:
            for message in messages:
                pipe.publish(channel, message)

    async def _publish_rest(self, channel: bytes, messages: list[bytes]) -> None:
        # Cluster, plain: PUBLISH reaches the subscribers on every node (the cluster bus forwards it).
        if self._publish_apart and not self.sharded:
            await asyncio.gather(*(self.client.publish(channel, m) for m in messages))

    async def _listen(self) -> None:
        backoff = 0.05
        attempt = 0
        while not self._closed:
            pubsub = None
            try:
                started = time.perf_counter()
                try:
                    async with asyncio.timeout(max(self.timeout, 1.0)):
                        pubsub = await self._subscribe(reload=attempt > 0)
                except BaseException:
                    self.m_duration["subscribe"].observe(time.perf_counter() - started)
                    self.m_calls[("subscribe", "error")].inc()
                    raise
                self.m_duration["subscribe"].observe(time.perf_counter() - started)
                self.m_calls[("subscribe", "ok")].inc()
                self.breaker.success()  # Redis answers again: no need to wait for open_for
                if attempt:
                    # Re-established after a loss (or after a failed first try): messages may be lost.
                    self._clear_l1()
                self.subscriptions += 1
                self.subscribed.set()
                self.m_pubsub["sharded" if self.sharded else "plain"].set(1)
                async with self._progress:
                    self._progress.notify_all()
                backoff = 0.05
                purge_channel = (
                    self.shard_channels[self.purge_channel] if self.sharded else self.purge_channel
                )
                while not self._closed:
                    message = await self._next_message(pubsub)
                    if message is not None and (
                        self._on_purge(message["data"])
                        if message.get("channel") == purge_channel
                        else self._on_message(message["data"])
                    ):
                        async with self._progress:
                            self._progress.notify_all()
            except asyncio.CancelledError:
                raise
            except (_Lost, RedisUnavailable, TimeoutError, *self._errors) as exc:
                log.debug("redis subscription lost: %r", exc)
            except Exception:  # pragma: no cover - keep listening whatever happens
                log.exception("redis subscription failed")
            finally:
                self.subscribed.clear()
                for gauge in self.m_pubsub.values():
                    gauge.set(0)
                try:
                    if pubsub is not None:
                        async with asyncio.timeout(0.5):
                            await pubsub.aclose()
                except (TimeoutError, *self._errors):
                    pass
            attempt += 1
            await self.clock.sleep(backoff)
            backoff = min(backoff * 2, 1.0)

    async def _subscribe(self, reload: bool):
        """A new pub/sub subscribed to both channels: sharded or plain, per ``_sharded_pubsub``."""
        if self.options.mode != "cluster":
            pubsub = self.client.pubsub()
            await pubsub.subscribe(self.channel, self.purge_channel)
            return pubsub
        # The cluster's slot map: commands load it themselves, a subscription does not. After a loss it
        # is loaded again: the client refreshes it only when one of its own commands fails, so it may
        # still name a dead master (which a subscription would then try, and fail on, until then).
        await self.client.initialize()
        if reload:
            await self.client.nodes_manager.initialize()
        self.sharded = await self._sharded_pubsub()
        pubsub = self.client.pubsub()
        if self.sharded:
            await pubsub.ssubscribe(*self.shard_channels.values())
        else:
            await pubsub.subscribe(self.channel, self.purge_channel)
        return pubsub

    async def _sharded_pubsub(self) -> bool:
        """Cluster: whether to use sharded pub/sub (``pubsub``; auto: the channels' node is 7.0 or later)."""
        from redis.exceptions import ResponseError

        choice = self.options.pubsub
        if choice != "auto":
            return choice == "sharded"
        node = self.client.get_node_from_key(self.shard_channels[self.channel])
        try:
            info = await node.execute_command("INFO", "server")
        except ResponseError as exc:
            # INFO refused (an ACL): the version is unknown, plain pub/sub works on every version.
            log.warning("redis: INFO refused (%s): plain pub/sub (set state.redis.pubsub to choose)", exc)
            return False
        version = str(info.get("redis_version", "0")) if isinstance(info, dict) else "0"
        major = version.partition(".")[0]
        return major.isdigit() and int(major) >= 7

    async def _next_message(self, pubsub) -> dict | None:
        """The next message of another sidecar's or None (waits up to LISTEN_POLL); raises _Lost when a
        sharded subscription ended (its slot moved: a failover, a resharding)."""
        if not self.sharded:
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=LISTEN_POLL)
            return message if message is not None and message.get("type") == "message" else None
        if not pubsub.node_pubsub_mapping:
            raise _Lost("no shard subscription left")
        message = await pubsub.get_sharded_message(ignore_subscribe_messages=False, timeout=LISTEN_POLL)
        if message is None:
            return None
        kind = message.get("type")
        if kind in ("sunsubscribe", b"sunsubscribe"):
            # Redis ends a shard channel's subscription when its node stops serving the slot.
            raise _Lost("shard channel unsubscribed by the server")
        return message if kind in ("smessage", b"smessage") else None

    async def wait_subscriptions(self, count: int) -> None:
        """Wait until the subscription has been established ``count`` times (callers bound the wait)."""
        async with self._progress:
            await self._progress.wait_for(lambda: self.subscriptions >= count)

    async def wait_received(self, count: int) -> None:
        """Wait until ``count`` invalidations from other sidecars were applied (callers bound the wait)."""
        async with self._progress:
            await self._progress.wait_for(lambda: self.received >= count)

    def _on_message(self, data: bytes) -> bool:
        origin, _, key = data.partition(b" ")
        if origin == self.origin:
            return False
        self.received += 1
        self.m_received.inc()
        for store in list(self._stores):
            store.delete(key)
        return True

    async def wait_purges(self, count: int) -> None:
        """Wait until ``count`` purges from other sidecars were applied (callers bound the wait)."""
        async with self._progress:
            await self._progress.wait_for(lambda: self.purges_received >= count)

    def _on_purge(self, data: bytes) -> bool:
        origin, _, rest = data.partition(b" ")
        kind, _, value = rest.partition(b" ")
        if origin == self.origin or kind not in (b"tag", b"prefix"):
            return False
        dropped = 0
        for store in list(self._stores):
            dropped += store.purge(kind.decode(), value)
        label = kind.decode()
        self.m_purges.labels(label, "fleet").inc()
        self.m_purged.labels(label, "l1").inc(dropped)
        self.purges_received += 1
        return True

    def _clear_l1(self) -> None:
        self.l1_clears += 1
        for store in list(self._stores):
            for key in store.keys():
                store.delete(key)

    def snapshot(self) -> dict:
        return {
            "key_prefix": self.options.key_prefix,
            "breaker": "open" if self.breaker.is_open else "closed",
            "subscribed": self.subscribed.is_set(),
            "pubsub": "sharded" if self.sharded else "plain",
            "subscriptions": self.subscriptions,
            "l1_clears": self.l1_clears,
            "pending_writes": len(self._writes),
        }


def _client(options: RedisOptions, aioredis, Retry, NoBackoff):
    """The redis-py client for ``options.mode``: one endpoint, a Cluster, or the master Sentinel names."""
    if options.mode == "standalone":
        pool = aioredis.BlockingConnectionPool.from_url(
            options.url,
            max_connections=options.max_connections,
            timeout=options.timeout,
            socket_connect_timeout=options.timeout,
            retry=Retry(NoBackoff(), 1),  # one retry at once: a pooled connection that a Redis restart broke
            retry_on_timeout=False,
            health_check_interval=0,
        )
        return aioredis.Redis(connection_pool=pool)
    parts = urlsplit(options.url)
    username = unquote(parts.username or "") or None
    password = unquote(parts.password or "") or None
    tls = parts.scheme == "rediss"
    if options.mode == "cluster":
        from redis.asyncio.cluster import ClusterNode, RedisCluster

        # MOVED/ASK and a failover are followed by the client (its own bounded retries); Fender's
        # timeout and breaker still bound every call.
        return RedisCluster(
            startup_nodes=[ClusterNode(*_host_port(n)) for n in options.nodes],
            max_connections=options.max_connections,
            socket_timeout=options.timeout,
            socket_connect_timeout=options.timeout,
            require_full_coverage=False,
            # One retry, at once (the client reloads its slot map first): a dead node fails the call
            # fast, so Fender's breaker opens rather than every call running into the timeout.
            retry=Retry(NoBackoff(), 1),
            ssl=tls,
            username=username,
            password=password,
        )
    from redis.asyncio.sentinel import Sentinel

    watched = options.sentinel
    assert watched is not None  # RedisOptions refuses mode: sentinel without it
    sentinel = Sentinel(
        [_host_port(n) for n in watched.sentinels],
        socket_timeout=options.timeout,
        socket_connect_timeout=options.timeout,
    )
    db = int(parts.path.lstrip("/") or 0) if parts.path.lstrip("/").isdigit() else 0
    return sentinel.master_for(
        watched.service_name,
        socket_timeout=options.timeout,
        socket_connect_timeout=options.timeout,
        retry=Retry(NoBackoff(), 0),
        max_connections=options.max_connections,
        db=db,
        ssl=tls,
        username=username,
        password=password,
    )


async def _close_client(client) -> None:
    """Close a client and every socket it holds, whatever the mode."""
    from redis.asyncio.cluster import RedisCluster

    if isinstance(client, RedisCluster):
        await client.aclose()  # closes the connections of every node
        return
    await client.aclose(close_connection_pool=True)
    # Sentinel mode: the pool asks the sentinels for the master through clients of its own.
    manager = getattr(client.connection_pool, "sentinel_manager", None)
    for sentinel in getattr(manager, "sentinels", ()):
        await sentinel.aclose(close_connection_pool=True)


def _host_port(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def fleet_state(ctx) -> RedisState | None:
    """This Fender's RedisState when ``state.backend`` is redis, else None (one per runtime build)."""
    options = getattr(ctx.policy, "state", None)
    if options is None or options.backend != "redis":
        return None
    redis_options = options.redis
    # The same key within a build gives the same object: one client for every route.
    state = ctx.keep(STATE_KEY, redis_options, lambda: RedisState(redis_options, ctx.metrics, ctx.clock))
    ctx.expose("state", "redis", state)
    return state
