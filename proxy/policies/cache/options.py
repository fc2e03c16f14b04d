"""Policy sections of the response cache: the route's ``cache:`` and the top-level store."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from proxy.options.base import Flag, PolicyModel, Text, keep_ordered
from proxy.options.units import Duration, Size, format_size, policy_error


class CacheKeyOptions(PolicyModel):
    """What identifies a stored response besides the method (GET/HEAD), host and path."""

    query: Literal["as-is", "sorted", "ignore"] = Field(
        default="as-is",
        description=(
            "How the query string enters the key: `as-is` (byte for byte), `sorted` (parameters sorted, so "
            "?a=1&b=2 and ?b=2&a=1 share one entry) or `ignore` (the query is left out: only for upstreams "
            "whose answer does not depend on it)."
        ),
    )
    headers: tuple[Annotated[Text, Field(pattern=r"^[A-Za-z0-9!#$%&'*+.^_`|~-]{1,64}$")], ...] = Field(
        default=(),
        description=(
            "Request header names whose values also select the stored response (like a Vary the upstream "
            "did not send), e.g. [Accept-Language]. Empty: only the upstream's own Vary applies."
        ),
    )

    @field_validator("headers")
    @classmethod
    def _lower(cls, names: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(dict.fromkeys(n.lower() for n in names))


class CacheOptions(PolicyModel):
    """A shared HTTP cache (RFC 9111) in front of this route's upstream."""

    @field_validator("targeted_fields")
    @classmethod
    def _targets(cls, names: tuple[str, ...]) -> tuple[str, ...]:
        names = tuple(dict.fromkeys(n.lower() for n in names))
        if "cache-control" in names:
            raise policy_error(
                "cache.targeted_fields lists fields obeyed before Cache-Control: cache-control cannot be one"
            )
        return names

    enabled: Flag = Field(
        default=True,
        description="false turns the cache off for this route while keeping its settings in the file.",
    )
    default_ttl: Duration = Field(
        default="0s",
        validate_default=True,
        description=(
            "Freshness given to a response that carries no freshness information at all (no max-age, "
            "s-maxage, Expires or Last-Modified) and whose status is cacheable by default (200, 404, ...). "
            "0s follows the upstream's headers only. Never overrides no-store, private or no-cache."
        ),
    )
    key: CacheKeyOptions = Field(
        default_factory=CacheKeyOptions,
        description="What besides method, host and path selects a stored response.",
    )
    stale_while_revalidate: Duration = Field(
        default="0s",
        validate_default=True,
        description=(
            "After a response goes stale, serve it for this long more while one background request "
            "refreshes it (RFC 5861). The response's own stale-while-revalidate applies too (the larger "
            "wins). Never for responses marked must-revalidate, proxy-revalidate, s-maxage or no-cache."
        ),
    )
    stale_if_error: Duration = Field(
        default="0s",
        validate_default=True,
        description=(
            "Forward recovery: when the upstream answers 5xx, times out, refuses connections or the "
            "breaker is open, serve a stale response up to this long past its freshness. 0s: only what "
            "the response's own stale-if-error allows."
        ),
    )
    coalesce_timeout: Annotated[Duration, Field(gt=0)] = Field(
        default="5s",
        validate_default=True,
        description=(
            "Concurrent misses for one URL wait for the first one's upstream response this long at most "
            "(like nginx proxy_cache_lock_timeout 5s); after it, each goes to the upstream itself."
        ),
    )
    max_request_stale_if_error: Duration = Field(
        default="10m",
        validate_default=True,
        description=(
            "A client's own `Cache-Control: stale-if-error=N` (RFC 5861, request direction) lets that "
            "request have a stale response up to N past its freshness when the upstream fails, but never "
            "more than this. Never for responses marked must-revalidate, no-cache and friends. 0s ignores "
            "the request directive (the response's and the route's stale_if_error still apply)."
        ),
    )
    set_cookie: Literal["pass", "store"] = Field(
        default="pass",
        description=(
            "A response carrying Set-Cookie: `pass` (default, like nginx and Varnish) is not stored and "
            "reaches its client whole, so one client's cookie is never served to another; `store` stores "
            "it with its Set-Cookie and serves that to every client (only for upstreams whose cookies are "
            'the same for everyone). A response saying `private="Set-Cookie"` is stored without the '
            "cookie either way (RFC 9111 5.2.2.7)."
        ),
    )
    targeted_fields: tuple[Annotated[Text, Field(pattern=r"^[A-Za-z0-9!#$%&'*+.^_`|~-]{1,64}$")], ...] = (
        Field(
            default=("fender-cache-control", "surrogate-control", "cdn-cache-control"),
            description=(
                "Response fields that control Fender's own storing decision before Cache-Control (RFC 9213 "
                "targeted fields, W3C Surrogate-Control), in order: the first present with a value wins and "
                "Cache-Control and Expires are then ignored by Fender (the client still gets Cache-Control "
                "unchanged). Surrogate-Control and Fender-Cache-Control, when listed, are removed from "
                "responses leaving Fender. Empty: Cache-Control only."
            ),
        )
    )
    tag_header: Annotated[Text, Field(pattern=r"^[A-Za-z0-9!#$%&'*+.^_`|~-]{1,64}$")] | None = Field(
        default="Cache-Tag",
        description=(
            "Response header whose values tag the stored response (comma- or space-separated, like "
            "Cloudflare's Cache-Tag or Fastly's Surrogate-Key), so POST /admin/cache/purge "
            '{"tags": [...]} can drop every response with a tag. At most 32 tags of 128 bytes each per '
            "response are kept. null: no tags."
        ),
    )
    forward_tag_header: Flag = Field(
        default=False,
        description=(
            "false: the tag header is removed before the response reaches the client (and is not stored "
            "with it); true: it is passed on."
        ),
    )
    uncacheable_ttl: Duration = Field(
        default="60s",
        validate_default=True,
        description=(
            "After an upstream answer for a URL turns out not storable, concurrent misses for that URL stop "
            "waiting for each other for this long (Varnish's hit-for-miss): an uncacheable URL under load "
            "is not serialised behind one request at a time. 0s turns it off."
        ),
    )


class CacheStoreOptions(PolicyModel):
    """The in-memory store every caching route shares."""

    max_size: Annotated[Size, Field(gt=0)] = Field(
        default="64MiB",
        validate_default=True,
        description=(
            "Memory for all stored responses (headers + bodies); beyond it the least recently used are "
            "evicted. 64MiB suits a sidecar; raise it for a catalog-style upstream."
        ),
    )
    max_object_size: Annotated[Size, Field(gt=0)] = Field(
        default="8MiB",
        validate_default=True,
        description=(
            "Largest single response stored; larger bodies stream through to the client uncached, "
            "never buffered whole."
        ),
    )

    @model_validator(mode="after")
    def _object_fits(self) -> CacheStoreOptions:
        keep_ordered(
            self,
            "max_object_size",
            "max_size",
            f"cache.max_object_size ({format_size(self.max_object_size)}) cannot be larger than "
            f"cache.max_size ({format_size(self.max_size)})",
            "max_object_size",
            raise_high=False,  # the store's memory is never raised behind the user's back
        )
        return self
