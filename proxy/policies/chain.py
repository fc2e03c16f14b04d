"""The policies a route's pipeline may hold, outermost first: the one place that orders them.

Order (docs/architecture.md explains each position): a rate limit refuses before anything else
is spent; the cache answers hits before the breaker or a bulkhead slot is involved; the breaker
sees each call once, however many tries the retry layer makes inside it; the bulkhead holds one
slot per request across its tries, and so does the adaptive concurrency limit (whose latency is
the request's, tries included); retry calls the layers below once per try; fault injection is
innermost, in the upstream's place, so every layer above meets an injected delay or abort as it
would a real one (a retry retries it, a breaker counts it, the cache serves stale for it). Each entry is the
route field that turns the policy on and its layer factory (:class:`~proxy.policies.context.BuildLayer`).
"""

from __future__ import annotations

from proxy.policies.adaptive import layer as adaptive
from proxy.policies.breaker import layer as breaker
from proxy.policies.bulkhead import layer as bulkhead
from proxy.policies.cache import layer as cache
from proxy.policies.context import BuildLayer
from proxy.policies.fault import layer as fault
from proxy.policies.ratelimit import layer as ratelimit
from proxy.policies.retry import layer as retry

ORDER: tuple[tuple[str, BuildLayer], ...] = (
    ("rate_limit", ratelimit.build_layer),
    ("cache", cache.build_layer),
    ("circuit_breaker", breaker.build_layer),
    ("bulkhead", bulkhead.build_layer),
    ("adaptive_concurrency", adaptive.build_layer),
    ("retry", retry.build_layer),
    ("fault", fault.build_layer),
)
