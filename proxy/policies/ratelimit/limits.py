"""A route's local limits: the keys requests are counted by, the buckets, the 429 and its headers.

Shared by the local layer (layer.py) and the fleet layer (fleet.py), which falls back to these
when Redis is unavailable."""

from __future__ import annotations

import hashlib
import math
import weakref
from collections.abc import Callable
from fractions import Fraction
from typing import Any

from proxy.clock import Clock
from proxy.kernel.exchange import Exchange, LocalReply
from proxy.metrics import FastCounter, Metrics
from proxy.policies.context import LayerContext
from proxy.policies.ratelimit.gcra import MAX_KEY_BYTES, MISSING, Limiter
from proxy.policies.ratelimit.options import RateLimitOptions, period_of

# What a request is counted by: the client's address, a header's value (or its digest), the route.
Key = str | bytes
KeyOf = Callable[[Exchange], Key]


def client_address(ex: Exchange) -> Key:
    return ex.client or "unknown"


def _route_key(ex: Exchange) -> Key:
    return ""


def _header_key(name: bytes) -> KeyOf:
    def key(ex: Exchange) -> Key:
        for header, value in ex.request_headers:
            if header == name:
                if len(value) > MAX_KEY_BYTES:
                    # NUL never occurs in a header value, so a digest cannot equal a sent value.
                    return b"\x00" + hashlib.blake2b(value, digest_size=16).digest()
                return value
        return MISSING

    return key


def key_function(key: str) -> KeyOf:
    if key == "client_ip":
        return client_address
    if key == "route":
        return _route_key
    return _header_key(key[7:].encode("latin-1"))


def _sf_string(text: str) -> bytes:
    return b'"' + text.replace("\\", "\\\\").replace('"', '\\"').encode("ascii") + b'"'


def policy_item(options: RateLimitOptions) -> bytes:
    """The RateLimit-Policy item: q requests per w seconds (w a whole number of seconds, at least 1)."""
    period = period_of(options.rate)
    window = max(1, math.ceil(period))
    quota = math.floor(Fraction(options.rate.count) * window / period)
    return _sf_string(_name_of(options)) + b";q=%d;w=%d" % (quota, window)


def _name_of(options: RateLimitOptions) -> str:
    assert options.name is not None  # filled in by RateLimitOptions when left out
    return options.name


class _Limit:
    __slots__ = ("options", "name", "limiter", "key_of", "shadow", "label")

    def __init__(self, options: RateLimitOptions) -> None:
        self.options = options
        self.name = _name_of(options)
        self.limiter = Limiter.from_options(options)
        self.key_of = key_function(options.key)
        self.shadow = options.shadow
        self.label = _sf_string(self.name)


class RouteRateLimit:
    """Every limit of one route, with its metric children; built once per policy load."""

    def __init__(
        self, route_name: str, limits: tuple[RateLimitOptions, ...], clock: Clock, metrics: Metrics
    ) -> None:
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

    def decide(self, ex: Exchange, now_ns: int, consume: bool = True) -> LocalReply | None:
        """Admit (returns None, consuming from every bucket) or refuse (returns the 429 reply).

        With ``consume`` False an admission only looks: nothing is taken, counted or added to the
        response (the fleet layer asks so before its global limits, then again once they admitted).
        """
        keys = [limit.key_of(ex) for limit in self.limits]
        refused: list[_Limit] | None = None
        shadow_refused: list[_Limit] | None = None
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
            return LocalReply("rate_limited", f"limit {names}", headers=headers)
        if not consume:
            return None
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

    def describe(self, ex: Exchange, now_ns: int) -> None:
        """Add the RateLimit headers of the shown limits as they stand, consuming nothing."""
        if self.shown:
            keys = [limit.key_of(ex) for limit in self.limits]
            ex.response_headers.append((b"ratelimit-policy", self.shown_policy_header))
            ex.response_headers.append((b"ratelimit", self._state(keys, now_ns, self.shown)))

    def _state(self, keys: list[Key], now_ns: int, shown: list[_Limit] | None = None) -> bytes:
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

    def snapshot(self) -> dict[str, Any]:
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


def _keys_of(ref: weakref.ref[RouteRateLimit]) -> float:
    target = ref()
    return float(target.key_count) if target is not None else 0.0


def keep_buckets(state: RouteRateLimit, ctx: LayerContext) -> None:
    """On a reload, keep each limit's bucket table when that limit's settings did not change.

    Keyed by route and limit name, compared on the limit's options (rate, burst, key, max_keys,
    ...): an unchanged limit goes on with the same table, so a reload neither refills nor empties
    anyone's bucket; a changed or new limit starts with fresh (full) buckets.
    """
    for limit in state.limits:
        fresh = limit.limiter
        limit.limiter = ctx.keep(("ratelimit", state.route, limit.name), limit.options, _given(fresh))


def _given(limiter: Limiter) -> Callable[[], Limiter]:
    return lambda: limiter
