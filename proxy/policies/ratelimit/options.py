"""Rate-limit settings: the route's `rate_limit:` section, one limit or a list that all apply."""

from __future__ import annotations

import math
import re
from decimal import Decimal
from fractions import Fraction
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import AfterValidator, Discriminator, Field, Tag, model_validator

from proxy.options.base import Count, Flag, Name, PolicyModel, Text
from proxy.options.units import Rate, RateValue, describe_value, policy_error

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
    return Fraction(rate.count) / period_of(rate)


def period_of(rate: RateValue) -> Fraction:
    """The rate's period in seconds, exactly as written (the float holds a short decimal)."""
    return Fraction(Decimal(repr(rate.per_seconds)))


def _as_tuple(value: RateLimitOptions | tuple[RateLimitOptions, ...]) -> tuple[RateLimitOptions, ...]:
    limits = (value,) if isinstance(value, RateLimitOptions) else tuple(value)
    if not limits:
        raise policy_error("give at least one limit, or leave rate_limit out")
    seen: dict[str | None, int] = {}
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


if TYPE_CHECKING:
    # What the field holds once validated (_as_tuple), whichever shape was written.
    RateLimits = tuple[RateLimitOptions, ...]
else:
    RateLimits = Annotated[
        Annotated[RateLimitOptions, Tag("limit")] | Annotated[tuple[RateLimitOptions, ...], Tag("list")],
        # Only the branch matching the shape is validated, so errors name the real problem.
        Discriminator(_shape),
        AfterValidator(_as_tuple),
    ]
"""``rate_limit:`` on a route: one limit mapping, or a list of limits that all apply."""
