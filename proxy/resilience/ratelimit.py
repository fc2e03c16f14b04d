"""Per-route rate limits: GCRA buckets with exact integer arithmetic.

A route's ``rate_limit:`` is one mapping or a list of them; every limit in the
list applies. Each limit keeps one bucket per key (client address, a request
header's value, or the whole route) in a bounded LRU table.

Algorithm: GCRA (the generic cell rate algorithm, a token bucket stored as one
number per key: the "theoretical arrival time" TAT). With a rate of C requests
per P nanoseconds and a burst of B, a request at time ``now`` is admitted when
``max(TAT, now) - now <= (B - 1) * P / C`` and then moves TAT on by ``P / C``.
To stay exact, time is kept in units of ``1 / C`` nanoseconds, so every
quantity is a Python integer: no float accumulates, however long it runs.
A fresh key admits B requests at once; over any window of length T at most
``B + floor(T * C / P)`` requests pass.

A key whose TAT is in the past has a full bucket, which is exactly what a new
key gets, so such entries carry no information: they are dropped when they
reach the cold end of the table (idle expiry). The table never holds more
than ``max_keys`` entries; beyond that the least recently used key goes.

Response headers follow draft-ietf-httpapi-ratelimit-headers-11 (May 2026):
``RateLimit-Policy: "name";q=Q;w=W`` and ``RateLimit: "name";r=R;t=T``.
"""

from __future__ import annotations

import hashlib
import math
import re
import weakref
from collections import OrderedDict
from decimal import Decimal
from fractions import Fraction
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Discriminator, Field, Tag, model_validator

from proxy.config.base import Count, Flag, Name, PolicyModel, Text
from proxy.config.units import Rate, RateValue, describe_value, policy_error
from proxy.dataplane.exchange import LocalReply
from proxy.metrics import FastCounter

__all__ = ["RateLimitOptions", "RateLimits", "Limiter", "RouteRateLimit", "build_layer"]

NS = 1_000_000_000
# Header values longer than this are keyed by a 16-byte digest, so a key costs
# at most this many bytes whatever clients send.
MAX_KEY_BYTES = 64
# Cold entries examined for idle expiry on each new key (amortised O(1)).
EXPIRE_SCAN = 2
MISSING = b"\x00missing"

_TOKEN_RE = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


def _check_key(value: str) -> str:
    if value in ("client_ip", "route"):
        return value
    if value.lower().startswith("header:"):
        name = value[7:].strip()
        if not _TOKEN_RE.fullmatch(name):
            raise policy_error(f"{describe_value(value)}: {describe_value(name)} is not a valid header name")
        return "header:" + name.lower()
    raise policy_error(
        f"{describe_value(value)} is not a rate-limit key (use client_ip, route, or header:NAME like header:X-Api-Key)"
    )


RateKey = Annotated[
    Text,
    AfterValidator(_check_key),
    # A JSON Schema pattern keeps editors honest without duplicating the message.
    Field(json_schema_extra={"pattern": r"^(client_ip|route|header:[!#$%&'*+.^_`|~0-9A-Za-z-]+)$"}),
]


class RateLimitOptions(PolicyModel):
    """One rate limit of a route: a bucket per key, refilled at `rate`, holding at most `burst`."""

    rate: Rate = Field(
        description=(
            "Sustained rate each key may send, e.g. 100/s, 6000/m or 5/10s. Requests beyond it (once the "
            "burst is used up) get 429 and never reach the upstream."
        ),
    )
    burst: Count | None = Field(
        default=None,
        ge=1,
        description=(
            "Bucket size: how many requests one key may send at once after being idle. Over any window of "
            "T seconds a key gets at most burst + rate x T requests. Default: one second of rate, at least 1."
        ),
    )
    key: RateKey = Field(
        default="client_ip",
        description=(
            "What gets its own bucket: client_ip (the TCP peer, or the client named by X-Forwarded-For when "
            "the peer is in server.trusted_proxies, or per server.trusted_hops), header:NAME (the header's value; requests without the "
            "header share one bucket), or route (one bucket for the whole route)."
        ),
    )
    name: Name | None = Field(
        default=None,
        description=(
            "Policy name shown in the RateLimit headers and the admin API. Default: derived from key "
            "(client_ip, route, header-x-api-key). Must be unique within the route."
        ),
    )
    shadow: Flag = Field(
        default=False,
        description=(
            "true: never reject; count what would have been limited (decision=shadow_limited) and let it "
            "pass. For trying a limit on live traffic before enforcing it. Shadow limits send no headers."
        ),
    )
    headers: Flag = Field(
        default=True,
        description=(
            "Describe this limit in the RateLimit-Policy and RateLimit headers (IETF draft) of allowed "
            "responses. 429 responses always describe every enforced limit, together with Retry-After."
        ),
    )
    max_keys: Count = Field(
        default=100_000,
        ge=1,
        description=(
            "Most keys (buckets) held in memory; beyond it the least recently used key is dropped (it then "
            "starts again with a full bucket). Keys whose bucket has refilled are dropped earlier. 100000 "
            "keys take roughly 20 MB."
        ),
    )

    scope: Literal["local", "global"] = Field(
        default="local",
        description=(
            "local: each sidecar keeps its own buckets. global: one bucket per key for the whole fleet, "
            "kept in Redis (needs state.backend: redis; Redis's clock). Each sidecar leases batches of "
            "tokens from it (see state.redis.lease_time and lease_share) unless exact is true. While Redis "
            "is unavailable, state.redis.on_failure decides."
        ),
    )
    exact: Flag = Field(
        default=False,
        description=(
            "Global limits only. true: one atomic Redis script per request (no leases), for limits where "
            "the last token matters more than a Redis round trip per request. A route with an exact or a "
            "shadow global limit decides all its global limits this way."
        ),
    )

    @model_validator(mode="after")
    def _fill_defaults(self) -> RateLimitOptions:
        # Frozen model: derived defaults are written through object.__setattr__ once, at load.
        if self.burst is None:
            object.__setattr__(self, "burst", max(1, math.floor(_per_second(self.rate))))
        if self.name is None:
            name = self.key.replace(":", "-")[:64]
            object.__setattr__(self, "name", name)
        return self


def _per_second(rate: RateValue) -> Fraction:
    return Fraction(rate.count) / _period(rate)


def _period(rate: RateValue) -> Fraction:
    """The rate's period in seconds, exactly as written (the float holds a short decimal)."""
    return Fraction(Decimal(repr(rate.per_seconds)))


def _as_tuple(value: RateLimitOptions | tuple[RateLimitOptions, ...]) -> tuple[RateLimitOptions, ...]:
    limits = (value,) if isinstance(value, RateLimitOptions) else tuple(value)
    if not limits:
        raise policy_error("give at least one limit, or leave rate_limit out")
    seen: dict[str, int] = {}
    for index, limit in enumerate(limits):
        if limit.name in seen:
            raise policy_error(
                f'two limits are named "{limit.name}" (limits {seen[limit.name]} and {index}); '
                "give each a distinct name:",
                index,
                "name",
            )
        seen[limit.name] = index
    return limits


def _shape(value: Any) -> str:
    return "list" if isinstance(value, list | tuple) else "limit"


RateLimits = Annotated[
    Annotated[RateLimitOptions, Tag("limit")] | Annotated[tuple[RateLimitOptions, ...], Tag("list")],
    # Only the branch matching the shape is validated, so errors name the real problem.
    Discriminator(_shape),
    AfterValidator(_as_tuple),
]
"""``rate_limit:`` on a route: one limit mapping, or a list of limits that all apply."""


# --------------------------------------------------------------------------- the algorithm


class Limiter:
    """One limit's bucket table: GCRA per key, integer time in units of 1/count ns.

    ``check(key, now_ns)`` says whether a request would pass without changing
    anything; ``commit`` then consumes. Splitting the two lets a route check
    all its limits before consuming from any (a request refused by the second
    limit does not use up the first one's tokens). Both are synchronous, so on
    the event loop nothing can come between them.
    """

    __slots__ = ("count", "period_ns", "burst", "max_keys", "_step", "_tau", "_table")

    def __init__(self, count: int, period_ns: int, burst: int, max_keys: int) -> None:
        self.count = count
        self.period_ns = period_ns
        self.burst = burst
        self.max_keys = max_keys
        self._step = period_ns  # emission interval P/C ns == P units of 1/C ns
        self._tau = (burst - 1) * period_ns  # tolerance (B-1)*P/C ns
        self._table: OrderedDict[Any, int] = OrderedDict()

    @classmethod
    def from_options(cls, options: RateLimitOptions) -> Limiter:
        period_ns = max(1, round(_period(options.rate) * NS))
        return cls(options.rate.count, period_ns, options.burst, options.max_keys)

    def __len__(self) -> int:
        return len(self._table)

    def check(self, key: Any, now_ns: int) -> int:
        """0 when a request for ``key`` at ``now_ns`` passes, else the wait in scaled units (> 0)."""
        tat = self._table.get(key)
        if tat is None:
            return 0
        wait = tat - self._tau - now_ns * self.count
        return wait if wait > 0 else 0

    def take(self, key: Any, now_ns: int, enforce: bool = True) -> int:
        """``check`` and ``commit`` in one lookup: the new TAT (scaled, > 0), or 0 when refused.

        With ``enforce`` False the request is consumed even over the limit (``commit``).
        """
        table = self._table
        now = now_ns * self.count
        tat = table.get(key)
        if tat is None:
            if len(table) >= self.max_keys:
                table.popitem(last=False)
            else:
                self._expire(now)
            tat = now + self._step
        else:
            if enforce and tat - self._tau - now > 0:
                return 0
            tat = (tat if tat > now else now) + self._step
            table.move_to_end(key)
        table[key] = tat
        return tat

    def commit(self, key: Any, now_ns: int) -> int:
        """Consume one request for ``key``; returns the new TAT (scaled)."""
        return self.take(key, now_ns, enforce=False)

    def _expire(self, now: int) -> None:
        # A bucket that refilled completely equals a fresh one: drop it from the cold end.
        table = self._table
        for _ in range(EXPIRE_SCAN):
            if not table:
                return
            key, tat = next(iter(table.items()))
            if tat > now:
                return
            del table[key]

    def remaining(self, key: Any, now_ns: int) -> int:
        """Requests ``key`` could send right now (the ``r`` of the RateLimit header)."""
        tat = self._table.get(key)
        now = now_ns * self.count
        used = tat - now if tat is not None and tat > now else 0
        return max(0, (self.burst * self._step - used) // self._step)

    def reset_seconds(self, key: Any, now_ns: int) -> int:
        """Whole seconds (rounded up) until ``key``'s bucket is full again (the ``t`` parameter)."""
        tat = self._table.get(key)
        now = now_ns * self.count
        if tat is None or tat <= now:
            return 0
        return -(-(tat - now) // (self.count * NS))

    def wait_seconds(self, wait_scaled: int) -> int:
        """A ``check`` result as whole seconds for Retry-After (rounded up, at least 1)."""
        return max(1, -(-wait_scaled // (self.count * NS)))

    def items(self):
        return self._table.items()


# --------------------------------------------------------------------------- keys


def _client_ip(ex) -> Any:
    return ex.client or "unknown"


def _route_key(ex) -> Any:
    return ""


def _header_key(name: bytes):
    def key(ex) -> Any:
        for header, value in ex.request_headers:
            if header == name:
                if len(value) > MAX_KEY_BYTES:
                    # NUL never occurs in a header value, so a digest cannot equal a sent value.
                    return b"\x00" + hashlib.blake2b(value, digest_size=16).digest()
                return value
        return MISSING

    return key


def key_function(key: str):
    if key == "client_ip":
        return _client_ip
    if key == "route":
        return _route_key
    return _header_key(key[7:].encode("latin-1"))


# --------------------------------------------------------------------------- the route's layer


def _sf_string(text: str) -> bytes:
    return b'"' + text.replace("\\", "\\\\").replace('"', '\\"').encode("ascii") + b'"'


def policy_item(options: RateLimitOptions) -> bytes:
    """The RateLimit-Policy item: q requests per w seconds (w a whole number of seconds, at least 1)."""
    period = _period(options.rate)
    window = max(1, math.ceil(period))
    quota = math.floor(Fraction(options.rate.count) * window / period)
    return _sf_string(options.name) + b";q=%d;w=%d" % (quota, window)


class _Limit:
    __slots__ = ("options", "name", "limiter", "key_of", "shadow", "label")

    def __init__(self, options: RateLimitOptions) -> None:
        self.options = options
        self.name = options.name
        self.limiter = Limiter.from_options(options)
        self.key_of = key_function(options.key)
        self.shadow = options.shadow
        self.label = _sf_string(options.name)


class RouteRateLimit:
    """Every limit of one route, with its metric children; built once per policy load."""

    def __init__(self, route_name: str, limits: tuple[RateLimitOptions, ...], clock, metrics) -> None:
        self.route = route_name
        self.clock = clock
        self.limits = [_Limit(o) for o in limits]
        self.enforced = [limit for limit in self.limits if not limit.shadow]
        # 429s describe every enforced limit; allowed responses those whose `headers` is on.
        self.policy_header = b", ".join(policy_item(limit.options) for limit in self.enforced)
        self.shown = [limit for limit in self.enforced if limit.options.headers]
        self.shown_policy_header = b", ".join(policy_item(limit.options) for limit in self.shown)
        family = metrics.ratelimit_requests
        self.allowed = FastCounter(family.labels(route_name, "allowed"))
        self.limited = FastCounter(family.labels(route_name, "limited"))
        self.shadow_limited = FastCounter(family.labels(route_name, "shadow_limited"))
        ref = weakref.ref(self)
        metrics.ratelimit_keys.labels(route_name).set_function(lambda: _keys_of(ref))

    @property
    def key_count(self) -> int:
        return sum(len(limit.limiter) for limit in self.limits)

    def decide(self, ex, now_ns: int):
        """Admit (returns None, consuming from every bucket) or refuse (returns the 429 reply)."""
        keys = [limit.key_of(ex) for limit in self.limits]
        refused = None
        shadow_refused = None
        wait = 0
        for limit, key in zip(self.limits, keys, strict=True):
            scaled = limit.limiter.check(key, now_ns)
            if scaled:
                if limit.shadow:
                    shadow_refused = shadow_refused or []
                    shadow_refused.append(limit)
                else:
                    refused = refused or []
                    refused.append(limit)
                    wait = max(wait, limit.limiter.wait_seconds(scaled))
        if refused is not None:
            self.limited.inc()
            names = ", ".join(limit.name for limit in refused)
            ex.note(f"ratelimit limited {names}")
            headers = [
                (b"retry-after", b"%d" % wait),
                (b"ratelimit-policy", self.policy_header),
                (b"ratelimit", self._state(keys, now_ns)),
            ]
            return LocalReply("rate_limited", f"limit {names}", status=429, headers=headers)
        for limit, key in zip(self.limits, keys, strict=True):
            if shadow_refused is None or limit not in shadow_refused:
                limit.limiter.commit(key, now_ns)
        if shadow_refused is not None:
            self.shadow_limited.inc()
            ex.note("ratelimit shadow_limited " + ", ".join(limit.name for limit in shadow_refused))
        else:
            self.allowed.inc()
        if self.shown:
            ex.response_headers.append((b"ratelimit-policy", self.shown_policy_header))
            ex.response_headers.append((b"ratelimit", self._state(keys, now_ns, self.shown)))
        return None

    def _state(self, keys: list, now_ns: int, shown: list | None = None) -> bytes:
        shown = self.enforced if shown is None else shown
        parts = []
        for limit, key in zip(self.limits, keys, strict=True):
            if limit not in shown:
                continue
            limiter = limit.limiter
            parts.append(
                limit.label
                + b";r=%d;t=%d" % (limiter.remaining(key, now_ns), limiter.reset_seconds(key, now_ns))
            )
        return b", ".join(parts)

    def snapshot(self) -> dict:
        """State for the admin API."""
        return {
            "limits": [
                {
                    "name": limit.name,
                    "key": limit.options.key,
                    "rate": str(limit.options.rate),
                    "burst": limit.options.burst,
                    "shadow": limit.shadow,
                    "keys": len(limit.limiter),
                    "max_keys": limit.options.max_keys,
                }
                for limit in self.limits
            ]
        }


def _keys_of(ref) -> float:
    target = ref()
    return float(target.key_count) if target is not None else 0.0


def _keep_buckets(state: RouteRateLimit, ctx) -> None:
    """On a reload, keep each limit's bucket table when that limit's settings did not change.

    Keyed by route and limit name, compared on the limit's options (rate, burst, key, max_keys,
    ...): an unchanged limit goes on with the same table, so a reload neither refills nor empties
    anyone's bucket; a changed or new limit starts with fresh (full) buckets.
    """
    from proxy.dataplane.runtime import keep  # late: the runtime imports the pipeline modules

    for limit in state.limits:
        fresh = limit.limiter
        limit.limiter = keep(ctx, ("ratelimit", state.route, limit.name), limit.options, lambda f=fresh: f)


async def _ready(reply):
    return reply


def build_layer(route, next_handler, ctx):
    limits = getattr(route, "rate_limit", None)
    if not limits:
        return None
    if any(limit.scope == "global" for limit in limits):  # fleet-wide limits in Redis (issue 10)
        from proxy.state.ratelimit import build_global_layer

        return build_global_layer(route, limits, next_handler, ctx)
    state = RouteRateLimit(route.name, limits, ctx.clock, ctx.metrics)
    _keep_buckets(state, ctx)
    ctx.shared.setdefault("ratelimit", {})[route.name] = state
    clock = ctx.clock
    if len(state.limits) == 1 and not state.limits[0].shadow:
        return _single_limit_layer(state, next_handler, clock)
    decide = state.decide

    def rate_limit_layer(ex):
        # A plain function returning the next layer's awaitable: admission needs nothing after
        # the call, so this layer adds no coroutine to the request's await chain.
        refusal = decide(ex, round(clock.now() * NS))
        if refusal is not None:
            return _ready(refusal)
        return next_handler(ex)

    return rate_limit_layer


def _single_limit_layer(state: RouteRateLimit, next_handler, clock):
    """The layer for the common shape, one enforced limit: admission in one bucket update.

    Everything it reads is bound here, once per policy load; a refusal goes to
    ``decide``, which builds the 429 (nothing was consumed). Same outcomes and
    headers as ``decide``.
    """
    limit = state.limits[0]
    limiter = limit.limiter  # after _keep_buckets: the table this route goes on with
    take = limiter.take
    key_of = None if limit.key_of is _client_ip else limit.key_of  # client address: read inline
    now = clock.now
    decide = state.decide
    allowed = state.allowed.inc
    shown = bool(state.shown)
    # The RateLimit header arithmetic of Limiter.remaining and reset_seconds, in scaled units.
    scale = limiter.count
    full = limiter.burst * limiter._step
    step = limiter._step
    second = limiter.count * NS
    policy_field = (b"ratelimit-policy", state.shown_policy_header)
    state_format = limit.label + b";r=%d;t=%d"

    def single_limit_layer(ex):
        now_ns = round(now() * NS)
        tat = take(ex.client or "unknown" if key_of is None else key_of(ex), now_ns)
        if not tat:
            return _ready(decide(ex, now_ns))
        allowed()
        if shown:
            used = tat - now_ns * scale  # the bucket now holds tat (> now) for this key: used > 0
            remaining = (full - used) // step
            # Seconds until full again, rounded up: 1 whenever at most a second's worth is used
            # (the usual case), without a long division of multi-digit integers.
            reset = 1 if used <= second else -(-used // second)
            value = state_format % (remaining if remaining > 0 else 0, reset)
            ex.response_headers += (policy_field, (b"ratelimit", value))
        return next_handler(ex)

    return single_limit_layer
