"""Global rate limits (``scope: global``): one atomic Lua GCRA script per decision in Redis.

The script reads Redis's own clock (``TIME``), so the sidecars' clocks never
enter the decision: every sidecar of the fleet shares one bucket per key. It
checks every global limit of the route and consumes from all of them only
when all admit (no read-modify-write race: Redis runs a script alone).

Semantics match the local limiter (proxy/resilience/ratelimit.py): a rate of
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

import math

from proxy.dataplane.exchange import LocalReply
from proxy.resilience.ratelimit import NS, RouteRateLimit, _period, policy_item
from proxy.state.redis import RedisUnavailable, fleet_state

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

US = 1_000_000


class _GlobalLimit:
    __slots__ = ("options", "name", "key_of", "shadow", "label", "step", "tau", "burst", "prefix", "args")

    def __init__(self, options, key_of, prefix: bytes) -> None:
        self.options = options
        self.name = options.name
        self.key_of = key_of
        self.shadow = options.shadow
        self.label = b'"' + options.name.encode() + b'"'
        self.step = float(_period(options.rate) * US / options.rate.count)
        self.burst = options.burst
        self.tau = (self.burst - 1) * self.step
        self.prefix = prefix
        self.args = (repr(self.step), repr(self.tau), "1" if self.shadow else "0")

    def redis_key(self, key) -> bytes:
        return self.prefix + (key if type(key) is bytes else str(key).encode())

    def remaining(self, used: int) -> int:
        return max(0, math.floor((self.burst * self.step - max(used, 0)) / self.step + 1e-6))

    @staticmethod
    def reset(used: int) -> int:
        return -(-max(used, 0) // US)


class GlobalRateLimit:
    """The rate limits of one route with at least one ``scope: global`` limit."""

    def __init__(self, route, limits, ctx, state) -> None:
        self.route = route.name
        self.clock = ctx.clock
        self.state = state
        self.on_failure = ctx.policy.state.redis.on_failure if state is not None else "local"
        local = [o for o in limits if o.scope != "global"]
        glob = [o for o in limits if o.scope == "global"]
        # Limits with scope local stay in this sidecar's memory, decided before the Redis call.
        self.local = RouteRateLimit(route.name, tuple(local), ctx.clock, ctx.metrics) if local else None
        # The global limits evaluated in memory: the fallback when on_failure is local.
        self.fallback = RouteRateLimit(route.name, tuple(glob), ctx.clock, ctx.metrics)
        prefix = state.prefix if state is not None else b"fender:"
        tag = "{" + route.name + "}" if len(glob) > 1 else route.name  # one Cluster slot per route
        self.limits = [
            _GlobalLimit(o, lim.key_of, prefix + b"rl:%s:%s:" % (tag.encode(), o.name.encode()))
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

    async def decide(self, ex):
        if self.local is not None:
            refusal = self.local.decide(ex, round(self.clock.now() * NS))
            if refusal is not None:
                return refusal
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
            return LocalReply("rate_limited", "global limit", status=429, headers=headers)
        if shadow_over:
            self.shadow_limited.inc()
            ex.note("ratelimit shadow_limited (global)")
        else:
            self.allowed.inc()
        if self.shown:
            ex.response_headers.append((b"ratelimit-policy", self.shown_policy_header))
            ex.response_headers.append((b"ratelimit", self._state(used, self.shown)))
        return None

    def _state(self, used: list, shown: list) -> bytes:
        parts = []
        for limit, u in zip(self.limits, used, strict=True):
            if limit in shown:
                parts.append(limit.label + b";r=%d;t=%d" % (limit.remaining(u), limit.reset(u)))
        return b", ".join(parts)

    def _failed(self, ex):
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
        return LocalReply(
            "rate_limit_unavailable",
            "the shared rate-limit state is unavailable",
            status=503,
            headers=[(b"retry-after", b"1")],
        )

    def snapshot(self) -> dict:
        out = self.fallback.snapshot()
        for item in out["limits"]:
            item["scope"] = "global"
            item["fallback_keys"] = item.pop("keys")
        if self.local is not None:
            out["limits"] = self.local.snapshot()["limits"] + out["limits"]
        out["redis_breaker"] = "open" if self.state is not None and self.state.breaker.is_open else "closed"
        return out


def build_global_layer(route, limits, next_handler, ctx):
    state = fleet_state(ctx)
    limit = GlobalRateLimit(route, limits, ctx, state)
    ctx.shared.setdefault("ratelimit", {})[route.name] = limit
    decide = limit.decide

    async def global_rate_limit_layer(ex):
        refusal = await decide(ex)
        if refusal is not None:
            return refusal
        return await next_handler(ex)

    return global_rate_limit_layer
