"""The top-level ``state:`` section: where shared state lives (memory or Redis)."""

from __future__ import annotations

from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import AfterValidator, Field, field_validator, model_validator

from proxy.options.base import Count, PolicyModel, Text
from proxy.options.units import Duration, Percent, describe_value, policy_error


def _check_address(value: str) -> str:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise policy_error(f"{describe_value(value)} is not host:port (write e.g. 10.0.0.1:6379)")
    return value


Address = Annotated[Text, AfterValidator(_check_address)]


class SentinelOptions(PolicyModel):
    """Redis Sentinel: where the sentinels are and which master they watch."""

    sentinels: tuple[Address, ...] = Field(
        min_length=1,
        description="The sentinels, host:port each (26379 is Sentinel's usual port); any one answering is enough.",
    )
    service_name: Text = Field(
        min_length=1,
        description="The master's name in the sentinels' configuration (sentinel monitor <name> ...).",
    )


class RedisOptions(PolicyModel):
    """The Redis that a fleet of Fenders shares (cache L2, global rate limits, invalidations)."""

    mode: Literal["standalone", "cluster", "sentinel"] = Field(
        default="standalone",
        description=(
            "standalone: the one Redis at url. cluster: a Redis Cluster (or Valkey cluster) found from the "
            "seed nodes; keys a script touches share one hash slot. sentinel: the master that the sentinels "
            "name, followed through failovers. In cluster and sentinel mode url gives only credentials, "
            "TLS (rediss://) and, for sentinel, the database."
        ),
    )
    nodes: tuple[Address, ...] = Field(
        default=(),
        description="mode: cluster: seed nodes, host:port each; the rest of the cluster is discovered.",
    )
    sentinel: SentinelOptions | None = Field(
        default=None,
        description="mode: sentinel: the sentinels and the service (master) name.",
    )
    pubsub: Literal["auto", "sharded", "plain"] = Field(
        default="auto",
        description=(
            "mode: cluster: how invalidations and purges travel. sharded: SPUBLISH/SSUBSCRIBE on one hash "
            "slot (Redis or Valkey 7.0 and later; only the nodes serving that slot carry them). plain: "
            "PUBLISH/SUBSCRIBE, which the cluster bus copies to every node. auto: sharded when the node "
            "serving the channels' slot says (INFO) it is 7.0 or later, checked at every (re)subscription; "
            "plain when INFO is refused. Every sidecar "
            "of a fleet must use the same: a sharded and a plain subscriber do not hear each other."
        ),
    )
    url: Text = Field(
        default="redis://127.0.0.1:6379/0",
        description=(
            "Redis URL: redis://[user:password@]host:port/db, or rediss:// for TLS. Every Fender of the "
            "fleet must use the same Redis and key_prefix to share state."
        ),
    )
    key_prefix: Text = Field(
        default="fender:",
        max_length=64,
        description=(
            "Prefix of every key and of the invalidation channel, so several fleets (or other programs) "
            "can share one Redis."
        ),
    )
    timeout: Duration = Field(
        default="50ms",
        validate_default=True,
        description=(
            "Longest wait for one Redis call (connect included). A call that takes longer counts as a "
            "failure: the request goes on without Redis (see on_failure), it is never delayed further."
        ),
    )
    on_failure: Literal["local", "open", "closed"] = Field(
        default="local",
        description=(
            "What global rate limits do while Redis is failing or its breaker is open: local (enforce the "
            "same limit in this sidecar's memory), open (admit every request), closed (refuse with 503 and "
            "Retry-After: 1). The cache always falls back to this sidecar's memory (L1)."
        ),
    )
    failure_threshold: Count = Field(
        default=5,
        ge=1,
        description=(
            "Consecutive failed Redis calls (errors or timeouts) that open Fender's breaker for Redis. While "
            "open, no call is made: the cache is L1 only and rate limits follow on_failure."
        ),
    )
    open_for: Duration = Field(
        default="2s",
        validate_default=True,
        description=(
            "How long the Redis breaker stays open before one trial call is let through; success closes it, "
            "failure opens it again for this long."
        ),
    )
    max_connections: Count = Field(
        default=32,
        ge=1,
        description="Most connections this Fender opens to Redis (a request beyond it fails fast, counted as an error).",
    )
    lock_ttl: Duration = Field(
        default="2s",
        validate_default=True,
        description=(
            "Fleet-wide coalescing of cache misses: the first sidecar to miss a URL holds a Redis lock this "
            "long (or until it stores the response) while other sidecars wait for the stored response "
            "(at most the route's cache coalesce_timeout). 0s turns fleet-wide coalescing off."
        ),
    )

    lease_time: Annotated[Duration, Field(gt=0)] = Field(
        default="500ms",
        validate_default=True,
        description=(
            "Global rate limits (not exact): how long the tokens a sidecar leases from the fleet bucket stay "
            "spendable; unspent ones are dropped after it, so a sidecar that goes quiet or dies holds "
            "tokens for at most this long. The batch leased is this sidecar's demand over this time."
        ),
    )
    lease_share: Annotated[Percent, Field(gt=0)] = Field(
        default="10%",
        validate_default=True,
        description=(
            "Largest lease, as a share of the limit's burst (at least 1 token): at any instant the "
            "fleet's leases hold at most sidecars x max(1, floor(burst x lease_share)) tokens per key."
        ),
    )

    @model_validator(mode="after")
    def _mode_needs(self) -> RedisOptions:
        if self.mode == "cluster" and not self.nodes:
            raise policy_error('mode: cluster needs nodes (seed nodes, e.g. ["10.0.0.1:6379"])')
        if self.mode == "sentinel" and self.sentinel is None:
            raise policy_error(
                "mode: sentinel needs sentinel: {sentinels: [host:port, ...], service_name: NAME}"
            )
        if self.mode != "cluster" and self.nodes:
            raise policy_error("nodes is for mode: cluster")
        if self.mode != "sentinel" and self.sentinel is not None:
            raise policy_error("sentinel is for mode: sentinel")
        if self.mode != "cluster" and self.pubsub != "auto":
            raise policy_error("pubsub is for mode: cluster (standalone and sentinel use plain PUBLISH)")
        return self

    @field_validator("url")
    @classmethod
    def _check_url(cls, url: str) -> str:
        parts = urlsplit(url)
        if parts.scheme not in ("redis", "rediss", "unix") or not (parts.hostname or parts.path):
            raise policy_error(
                f"{describe_value(url)} is not a Redis URL (write e.g. redis://127.0.0.1:6379/0)"
            )
        return url

    @field_validator("timeout")
    @classmethod
    def _positive_timeout(cls, value: float) -> float:
        if value <= 0:
            raise policy_error("timeout must be more than 0s (e.g. 50ms)")
        return value


class StateOptions(PolicyModel):
    """Where state shared by a fleet of sidecars lives."""

    backend: Literal["memory", "redis"] = Field(
        default="memory",
        description=(
            "memory: every sidecar keeps its own state (nothing to install). redis: the cache gets a shared "
            "second tier (L2) and invalidations reach every sidecar; rate limits with scope: global hold for "
            "the whole fleet. Needs the redis extra (pip install fender[redis])."
        ),
    )
    redis: RedisOptions | None = Field(
        default=None,
        description="The Redis to use when backend is redis (defaults apply when absent).",
    )

    @model_validator(mode="after")
    def _fill(self) -> StateOptions:
        if self.backend == "redis" and self.redis is None:
            object.__setattr__(self, "redis", RedisOptions())
        return self
