"""Global rate limits (``scope: global``): GCRA buckets in Redis, leased in batches or one script a request.

By default each sidecar leases batches of tokens from a key's fleet bucket
(``LEASE_LUA``, one script call per batch; sizing in proxy/policies/ratelimit/lease.py)
and spends them in memory, renewing in the background when a quarter of the
batch is left. A limit with ``exact: true`` (or a shadow global limit) makes
the route decide every request with ``GCRA_LUA`` instead.

The script reads Redis's own clock (``TIME``), so the sidecars' clocks never
enter the decision: every sidecar of the fleet shares one bucket per key. It
checks every global limit of the route and consumes from all of them only
when all admit (no read-modify-write race: Redis runs a script alone).

Semantics match the local limiter (proxy/policies/ratelimit/gcra.py): a rate of
C per P and a burst of B admit at most ``B + floor(T * C / P)`` requests per
key over any window T, across the whole fleet; the same Retry-After,
RateLimit-Policy and RateLimit headers. Time in the script is in
microseconds (a double holds today's epoch in microseconds exactly).

When Redis fails, times out, or its breaker is open, ``state.redis.on_failure``
decides: ``local`` evaluates the same limits in this sidecar's memory (so the
fleet admits up to N x rate with N sidecars), ``open`` admits, ``closed``
refuses with 503 (reason rate_limit_unavailable, Retry-After: 1). 503, not
429: the client did not exceed anything, Fender cannot tell.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable
from typing import Any

from proxy.config.models import Route
from proxy.kernel.exchange import Exchange, Handler, LocalReply, Reply
from proxy.policies.context import LayerContext
from proxy.policies.ratelimit.gcra import NS
from proxy.policies.ratelimit.lease import Lease, LeaseTable
from proxy.policies.ratelimit.limits import Key, KeyOf, RouteRateLimit, policy_item
from proxy.policies.ratelimit.options import RateLimitOptions, period_of
from proxy.state.redis import RedisState, RedisUnavailable, fleet_state

# KEYS: one bucket per global limit. ARGV: per limit, step (emission interval, us), tau
# ((burst - 1) * step, us) and shadow (1: never refuses). Returns
# {admitted, wait_us, shadow_over, used_1 .. used_n} with used_i = TAT_i - now in us.
GCRA_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local n = #KEYS
local tats = {}
local over = {}
local wait = 0
local shadow_over = 0
for i = 1, n do
  local tat = tonumber(redis.call('GET', KEYS[i]))
  if tat == nil or tat < now then tat = now end
  tats[i] = tat
  local w = tat - tonumber(ARGV[3 * i - 1]) - now
  if w > 0 then
    if ARGV[3 * i] == '1' then
      over[i] = true
      shadow_over = shadow_over + 1
    elseif w > wait then
      wait = w
    end
  end
end
local out = {0, 0, shadow_over}
if wait > 0 then
  out[2] = math.ceil(wait)
  for i = 1, n do out[3 + i] = math.floor(tats[i] - now) end
  return out
end
out[1] = 1
for i = 1, n do
  local tat = tats[i]
  if not over[i] then
    tat = tat + tonumber(ARGV[3 * i - 2])
    redis.call('SET', KEYS[i], string.format('%.3f', tat), 'PX', math.ceil((tat - now) / 1000) + 1)
  end
  out[3 + i] = math.floor(tat - now)
end
return out
"""

# KEYS: one bucket per global limit. ARGV: per limit, step and tau (as for GCRA_LUA) and the tokens
# wanted. Takes as many of them as the bucket admits now (0 .. wanted) in one go. Returns, per limit,
# {granted, wait_us until as many as wanted are there again, used_us = TAT - now}.
LEASE_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local out = {}
for i = 1, #KEYS do
  local step = tonumber(ARGV[3 * i - 2])
  local tau = tonumber(ARGV[3 * i - 1])
  local want = tonumber(ARGV[3 * i])
  local tat = tonumber(redis.call('GET', KEYS[i]))
  if tat == nil or tat < now then tat = now end
  local room = tau + now - tat
  local got = 0
  if room >= 0 then got = math.min(want, math.floor(room / step + 1e-9) + 1) end
  if got > 0 then
    tat = tat + got * step
    redis.call('SET', KEYS[i], string.format('%.3f', tat), 'PX', math.ceil((tat - now) / 1000) + 1)
  end
  -- When short, the wait until a whole batch is there: a sidecar that lost the race for tokens asks
  -- again for a batch, not for each token as it comes (what it waits out stays in the bucket).
  local wait = tat + (want - 1) * step - tau - now
  if wait < 0 then wait = 0 end
  out[3 * i - 2] = got
  out[3 * i - 1] = math.ceil(wait)
  out[3 * i] = math.floor(tat - now)
end
return out
"""

US = 1_000_000
# Renewals one request waits for at most before it is refused (concurrent requests share renewals).
MAX_RENEWALS = 3
# A lease short of tokens: (limit, lease, key value).
_Pending = tuple["_GlobalLimit", Lease, Key]


class _GlobalLimit:
    __slots__ = (
        "options",
        "name",
        "key_of",
        "shadow",
        "label",
        "step",
        "tau",
        "burst",
        "prefix",
        "args",
        "leases",
    )

    def __init__(self, options: RateLimitOptions, key_of: KeyOf, prefix: bytes) -> None:
        assert options.name is not None and options.burst is not None  # filled in by RateLimitOptions
        self.options = options
        self.name = options.name
        self.key_of = key_of
        self.shadow = options.shadow
        self.label = b'"' + options.name.encode() + b'"'
        self.step = float(period_of(options.rate) * US / options.rate.count)
        self.burst = options.burst
        self.tau = (self.burst - 1) * self.step
        self.prefix = prefix
        self.args = (repr(self.step), repr(self.tau), "1" if self.shadow else "0")
        self.leases: LeaseTable | None = None  # set when the route leases

    @property
    def table(self) -> LeaseTable:
        """The lease table, on a route that leases."""
        assert self.leases is not None
        return self.leases

    def redis_key(self, key: Key) -> bytes:
        return self.prefix + (key if type(key) is bytes else str(key).encode())

    def remaining(self, used: int) -> int:
        return max(0, math.floor((self.burst * self.step - max(used, 0)) / self.step + 1e-6))

    @staticmethod
    def reset(used: int) -> int:
        return -(-max(used, 0) // US)


class GlobalRateLimit:
    """The rate limits of one route with at least one ``scope: global`` limit."""

    def __init__(
        self,
        route: Route,
        limits: tuple[RateLimitOptions, ...],
        ctx: LayerContext,
        state: RedisState | None,
    ) -> None:
        self.route = route.name
        self.clock = ctx.clock
        self.state = state
        self.on_failure = state.options.on_failure if state is not None else "local"
        local = [o for o in limits if o.scope != "global"]
        glob = [o for o in limits if o.scope == "global"]
        # Limits with scope local stay in this sidecar's memory, decided before the Redis call.
        self.local = RouteRateLimit(route.name, tuple(local), ctx.clock, ctx.metrics) if local else None
        # The global limits evaluated in memory: the fallback when on_failure is local.
        self.fallback = RouteRateLimit(route.name, tuple(glob), ctx.clock, ctx.metrics)
        prefix = state.prefix if state is not None else b"fender:"
        tag = "{" + route.name + "}" if len(glob) > 1 else route.name  # one Cluster slot per route
        self.limits = [
            _GlobalLimit(o, lim.key_of, prefix + b"rl:%s:%s:" % (tag.encode(), lim.name.encode()))
            for o, lim in zip(glob, self.fallback.limits, strict=True)
        ]
        self.args = [a for limit in self.limits for a in limit.args]
        self.enforced = [limit for limit in self.limits if not limit.shadow]
        self.shown = [limit for limit in self.enforced if limit.options.headers]
        self.policy_header = b", ".join(policy_item(limit.options) for limit in self.enforced)
        self.shown_policy_header = b", ".join(policy_item(limit.options) for limit in self.shown)
        family = ctx.metrics.ratelimit_requests
        self.allowed = family.labels(route.name, "allowed")
        self.limited = family.labels(route.name, "limited")
        self.shadow_limited = family.labels(route.name, "shadow_limited")
        self.failure_allowed = family.labels(route.name, "failure_allowed")
        self.failure_refused = family.labels(route.name, "failure_refused")
        self.script = state.script("gcra", GCRA_LUA) if state is not None else None
        # Per request, one script call for the route's global limits, or (leasing) the leases.
        self._decide_global: Callable[[Exchange], Awaitable[LocalReply | None]] = self._decide_direct
        # Leasing unless a global limit is exact or shadow (those need every request in Redis).
        self.leasing = state is not None and not any(o.exact or o.shadow for o in glob)
        if self.leasing and state is not None:
            redis = state.options
            for limit in self.limits:
                max_batch = math.floor(limit.burst * redis.lease_share)
                limit.leases = LeaseTable(ctx.clock, redis.lease_time, max_batch, limit.options.max_keys)
            self.lease_script = state.script("lease", LEASE_LUA)
            self.m_renewals = ctx.metrics.ratelimit_lease_renewals.labels(route.name)
            self.m_granted = ctx.metrics.ratelimit_lease_tokens.labels(route.name, "granted")
            self.m_expired = ctx.metrics.ratelimit_lease_tokens.labels(route.name, "expired")
            self._background: set[asyncio.Task[None]] = set()
            self._decide_global = self._decide_leased

    async def decide(self, ex: Exchange) -> LocalReply | None:
        """The route's local limits look first, the global ones decide, then the local ones consume.

        A local limit's token is spent only when the global limits admitted too: a request the
        fleet refuses leaves the local buckets as they were. The local limits are asked again
        after the global ones (a concurrent request may have taken their last token meanwhile);
        that rare refusal comes after a global token was spent.
        """
        local = self.local
        if local is None:
            return await self._decide_global(ex)
        refusal = local.decide(ex, round(self.clock.now() * NS), consume=False)
        if refusal is not None:
            return refusal
        refusal = await self._decide_global(ex)
        now_ns = round(self.clock.now() * NS)
        if refusal is not None:
            local.describe(ex, now_ns)
            return refusal
        return local.decide(ex, now_ns)

    async def _decide_direct(self, ex: Exchange) -> LocalReply | None:
        """The global limits, one script call a request."""
        if self.state is None:
            return self.fallback.decide(ex, round(self.clock.now() * NS))
        keys = [limit.redis_key(limit.key_of(ex)) for limit in self.limits]
        try:
            out = await self.state.call("ratelimit", self.script, keys=keys, args=self.args)
        except RedisUnavailable:
            return self._failed(ex)
        admitted, wait, shadow_over = out[0], out[1], out[2]
        used = out[3:]
        if not admitted:
            self.limited.inc()
            ex.note("ratelimit limited (global)")
            headers = [
                (b"retry-after", b"%d" % max(1, -(-wait // US))),
                (b"ratelimit-policy", self.policy_header),
                (b"ratelimit", self._state(used, self.enforced)),
            ]
            return LocalReply("rate_limited", "global limit", headers=headers)
        if shadow_over:
            self.shadow_limited.inc()
            ex.note("ratelimit shadow_limited (global)")
        else:
            self.allowed.inc()
        if self.shown:
            ex.response_headers.append((b"ratelimit-policy", self.shown_policy_header))
            ex.response_headers.append((b"ratelimit", self._state(used, self.shown)))
        return None

    # ------------------------------------------------------------------ leases

    async def _decide_leased(self, ex: Exchange, counted: bool = False) -> LocalReply | None:
        """Admit from this sidecar's leases, renewing them as needed (``counted``: demand already noted)."""
        limits = self.limits
        keys = [limit.key_of(ex) for limit in limits]
        leases = [limit.table.get(key) for limit, key in zip(limits, keys, strict=True)]
        if not counted:
            for lease in leases:
                lease.demand += 1
        now = self.clock.now()
        for _ in range(MAX_RENEWALS):
            short: list[_Pending] = []
            for limit, lease, key in zip(limits, leases, keys, strict=True):
                if not lease.tokens or now >= lease.expires:
                    if lease.tokens:
                        self.m_expired.inc(lease.tokens)
                        lease.tokens = 0
                    short.append((limit, lease, key))
            if not short:
                for lease in leases:
                    lease.tokens -= 1
                self.allowed.inc()
                low = [
                    (limit, lease, key)
                    for limit, lease, key in zip(limits, leases, keys, strict=True)
                    if limit.table.low(lease)
                ]
                if low:
                    self._renew_in_background(low)
                if self.shown:
                    ex.response_headers.append((b"ratelimit-policy", self.shown_policy_header))
                    ex.response_headers.append((b"ratelimit", self._lease_state(leases, now, self.shown)))
                return None
            blocked = max(lease.next_at for _, lease, _ in short)
            if now < blocked:
                # The fleet bucket has no token before then, for any sidecar: refuse without asking Redis.
                return self._lease_refusal(ex, leases, now, blocked - now)
            try:
                await self._renewed(short)
            except RedisUnavailable:
                if any(lease.tokens and now < lease.expires for lease in leases):
                    continue  # a concurrent renewal may have left tokens: look again
                return self._failed(ex)
            now = self.clock.now()
        return self._lease_refusal(ex, leases, now, 1.0)

    async def _renewed(self, short: list[_Pending]) -> None:
        """Wait for a renewal of each lease in ``short``: the one in flight, or a new one for the rest."""
        waiting = {id(lease.renewal): lease.renewal for _, lease, _ in short if lease.renewal is not None}
        fresh = [item for item in short if item[1].renewal is None]
        if fresh:
            task = self._start_renewal(fresh)
            waiting[id(task)] = task
        for task in waiting.values():
            await asyncio.shield(task)

    def _start_renewal(self, pairs: list[_Pending]) -> asyncio.Task[None]:
        task = asyncio.ensure_future(self._renew(pairs))
        for _, lease, _ in pairs:
            lease.renewal = task
        return task

    def _renew_in_background(self, pairs: list[_Pending]) -> None:
        task = self._start_renewal(pairs)
        self._background.add(task)
        task.add_done_callback(_forget(self._background))

    async def _renew(self, pairs: list[_Pending]) -> None:
        """One script call leasing a batch for every (limit, lease, key) in ``pairs``."""
        try:
            assert self.state is not None  # leasing needs Redis
            now = self.clock.now()
            keys: list[bytes] = []
            args: list[str] = []
            wanted: list[int] = []
            for limit, lease, key in pairs:
                want = limit.table.want(lease, now)
                wanted.append(want)
                keys.append(limit.redis_key(key))
                args += (limit.args[0], limit.args[1], str(want))
            out = await self.state.call("ratelimit", self.lease_script, keys=keys, args=args)
            now = self.clock.now()
            self.m_renewals.inc()
            for i, (limit, lease, _) in enumerate(pairs):
                got, wait_us, used_us = out[3 * i], out[3 * i + 1], out[3 * i + 2]
                self.m_granted.inc(got)
                limit.table.granted(lease, wanted[i], got, wait_us / US, used_us, now)
        finally:
            for _, lease, _ in pairs:
                lease.renewal = None

    def _lease_refusal(self, ex: Exchange, leases: list[Lease], now: float, wait: float) -> LocalReply:
        self.limited.inc()
        ex.note("ratelimit limited (global, leased)")
        headers = [
            (b"retry-after", b"%d" % max(1, math.ceil(wait))),
            (b"ratelimit-policy", self.policy_header),
            (b"ratelimit", self._lease_state(leases, now, self.enforced)),
        ]
        return LocalReply("rate_limited", "global limit", headers=headers)

    def _lease_state(self, leases: list[Lease], now: float, shown: list[_GlobalLimit]) -> bytes:
        # The fleet bucket as of the last renewal (aged since), plus what this sidecar holds.
        parts = []
        for limit, lease in zip(self.limits, leases, strict=True):
            if limit in shown:
                used = max(0, lease.used - round((now - lease.used_at) * US))
                held = lease.tokens if now < lease.expires else 0
                remaining = min(limit.burst, limit.remaining(used) + held)
                parts.append(limit.label + b";r=%d;t=%d" % (remaining, limit.reset(used)))
        return b", ".join(parts)

    def _state(self, used: list[int], shown: list[_GlobalLimit]) -> bytes:
        parts = []
        for limit, u in zip(self.limits, used, strict=True):
            if limit in shown:
                parts.append(limit.label + b";r=%d;t=%d" % (limit.remaining(u), limit.reset(u)))
        return b", ".join(parts)

    def _failed(self, ex: Exchange) -> LocalReply | None:
        mode = self.on_failure
        if mode == "local":
            ex.note("ratelimit redis unavailable: local limits")
            return self.fallback.decide(ex, round(self.clock.now() * NS))
        if mode == "open":
            self.failure_allowed.inc()
            ex.note("ratelimit redis unavailable: admitted")
            return None
        self.failure_refused.inc()
        ex.note("ratelimit redis unavailable: refused")
        return LocalReply("rate_limit_unavailable", headers=[(b"retry-after", b"1")])

    def snapshot(self) -> dict[str, Any]:
        out = self.fallback.snapshot()
        for item in out["limits"]:
            item["scope"] = "global"
            item["fallback_keys"] = item.pop("keys")
        if self.local is not None:
            out["limits"] = self.local.snapshot()["limits"] + out["limits"]
        out["redis_breaker"] = "open" if self.state is not None and self.state.breaker.is_open else "closed"
        out["leasing"] = self.leasing
        if self.leasing:
            for item, limit in zip(out["limits"][-len(self.limits) :], self.limits, strict=True):
                item["leases"] = len(limit.table)
                item["leased_tokens"] = limit.table.held()
        return out


def _forget(tasks: set[asyncio.Task[None]]) -> Callable[[asyncio.Task[None]], None]:
    def done(task: asyncio.Task[None]) -> None:
        tasks.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved: a failed background renewal was counted by the Redis client

    return done


def build_global_layer(
    route: Route, limits: tuple[RateLimitOptions, ...], next_handler: Handler, ctx: LayerContext
) -> Handler:
    state = fleet_state(ctx)
    limit = GlobalRateLimit(route, limits, ctx, state)
    ctx.expose("ratelimit", route.name, limit)
    decide = limit.decide
    if limit.leasing and limit.local is None and len(limit.limits) == 1:
        return _single_leased_layer(limit, next_handler)

    async def global_rate_limit_layer(ex: Exchange) -> Reply:
        refusal = await decide(ex)
        if refusal is not None:
            return refusal
        return await next_handler(ex)

    return global_rate_limit_layer


def _single_leased_layer(state: GlobalRateLimit, next_handler: Handler) -> Handler:
    """The common shape, one leased global limit: a token in hand admits without a coroutine of its own.

    Same outcomes, metrics and headers as ``GlobalRateLimit._decide_leased``, which takes over
    whenever the lease is empty or expired (renewal, refusal, on_failure).
    """
    limit = state.limits[0]
    key_of = limit.key_of
    table = limit.table
    get = table.get
    now = state.clock.now
    allowed = state.allowed.inc
    decide = state._decide_leased
    shown = bool(state.shown)
    policy_field = (b"ratelimit-policy", state.shown_policy_header)
    leases = [Lease(0.0)]  # a placeholder: the one lease is put in before each use

    async def renewing(ex: Exchange) -> Reply:
        refusal = await decide(ex, True)
        if refusal is not None:
            return refusal
        return await next_handler(ex)

    def single_leased_layer(ex: Exchange) -> Awaitable[Reply]:
        key = key_of(ex)
        lease = get(key)
        lease.demand += 1
        tokens = lease.tokens
        if tokens:
            at = now()
            if at < lease.expires:
                lease.tokens = tokens - 1
                allowed()
                if table.low(lease):
                    state._renew_in_background([(limit, lease, key)])
                if shown:
                    leases[0] = lease
                    ex.response_headers += (
                        policy_field,
                        (b"ratelimit", state._lease_state(leases, at, state.shown)),
                    )
                return next_handler(ex)
        return renewing(ex)

    return single_leased_layer
