"""Every Prometheus metric Fender exports, defined in one place.

Names follow Prometheus conventions (base units, ``_total`` for counters,
``_seconds`` for durations) and are part of Fender's interface: dashboards and
alerts depend on them, so rename only with a note in the changelog.

Label values come from the policy (route, upstream and replica names, a fixed
set of reasons) or from small closed sets (method, status class); never from
raw request data, so the number of series stays bounded whatever clients send.

Each metrics owner (a route, an upstream) pre-binds its label children once,
when the policy loads, so the request path never calls ``.labels()``.
"""

from __future__ import annotations

import contextlib
from bisect import bisect_left
from functools import partial
from itertools import count

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, disable_created_metrics
from prometheus_client import values as _prometheus_values

from proxy.kernel.reasons import KNOWN_METHODS

# The *_created series double the scrape size and no dashboard of ours uses them.
disable_created_metrics()


class _LoopValue:
    """A sample value without a mutex.

    prometheus-client guards every value with a threading.Lock, which costs
    about as much as the increment itself. Fender changes values only from its
    one event-loop thread; a scrape renders from a worker thread and only reads
    (a float attribute read is atomic under the GIL), so the lock buys nothing.
    """

    __slots__ = ("_value", "_exemplar", "ticks")
    _multiprocess = False

    def __init__(self, typ, metric_name, name, labelnames, labelvalues, help_text, **kwargs) -> None:
        self._value = 0.0
        self._exemplar = None
        # Increments by 1 from the request path: ``ticks.__next__`` is a C call, where ``inc(1)``
        # runs a Python frame; get() adds the two. See FastCounter.
        self.ticks = count()

    def inc(self, amount: float) -> None:
        self._value += amount

    def set(self, value: float, timestamp=None) -> None:
        self._value = value - _ticks_of(self.ticks)

    def set_exemplar(self, exemplar) -> None:
        self._exemplar = exemplar

    def get(self) -> float:
        return self._value + _ticks_of(self.ticks)

    def get_exemplar(self):
        return self._exemplar


def _ticks_of(ticks: count) -> int:
    """How many times ``ticks`` was advanced: its repr is ``count(N)`` (read on scrapes only)."""
    return int(repr(ticks)[6:-1])


def _add_one(value):
    """A callable adding 1 to a sample value: its C-level ticks, or inc(1) for another value class
    (prometheus-client's multiprocess mode, where _LoopValue is not installed)."""
    ticks = getattr(value, "ticks", None)
    return ticks.__next__ if ticks is not None else partial(value.inc, 1)


if _prometheus_values.ValueClass is _prometheus_values.MutexValue:  # not in multiprocess mode
    _prometheus_values.ValueClass = _LoopValue

# Methods outside KNOWN_METHODS (proxy/kernel/reasons.py) are counted as OTHER, so clients cannot
# invent series.
STATUS_CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx")

# Latency buckets for a sidecar: sub-millisecond to the default route timeout.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    """The registry and every metric family. One instance per proxy process."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "fender_requests_total",
            "Requests answered, by route, method and status class (including Fender's local answers once a route "
            "matched; requests no route takes are in fender_no_route_total).",
            ["route", "method", "status_class"],
            registry=r,
        )
        self.request_duration = Histogram(
            "fender_request_duration_seconds",
            "Time from the request head to the end of the response head, by route.",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self._active_counts: dict[str, ActiveCount] = {}
        self.in_flight = Gauge(
            "fender_requests_in_flight",
            "Requests being handled now, by route.",
            ["route"],
            registry=r,
        )
        self.no_route = Counter(
            "fender_no_route_total",
            "Requests that matched no route and got Fender's 404.",
            registry=r,
        )
        self.local_responses = Counter(
            "fender_local_responses_total",
            "Responses Fender generated itself instead of proxying, by route and reason.",
            ["route", "reason"],
            registry=r,
        )
        self.upstream_requests = Counter(
            "fender_upstream_requests_total",
            "Requests sent to an upstream, by upstream, replica and outcome (status class or fault reason).",
            ["upstream", "replica", "outcome"],
            registry=r,
        )
        self.upstream_duration = Histogram(
            "fender_upstream_request_duration_seconds",
            "Time from sending a request upstream until its response head arrived, by upstream.",
            ["upstream"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.upstream_errors = Counter(
            "fender_upstream_errors_total",
            "Upstream faults by upstream and reason (connect_failure, timeout, reset, ...).",
            ["upstream", "reason"],
            registry=r,
        )
        self.pool_connections = Gauge(
            "fender_upstream_pool_connections",
            "Connections in each replica's pool, by state (in_use, idle).",
            ["upstream", "replica", "state"],
            registry=r,
        )
        self.pool_streams = Gauge(
            "fender_upstream_pool_streams",
            "HTTP/2 streams open to each replica of a protocol: h2 upstream (requests in flight, all its connections).",
            ["upstream", "replica"],
            registry=r,
        )
        # metrics: TLS (proxy/server/tls.py, proxy/upstream/tls.py)
        self.tls_handshake_errors = Counter(
            "fender_tls_handshake_errors_total",
            "Client connections to a TLS listener (proxy or admin) that did not complete a handshake, by "
            "reason: timeout, plain_http, not_tls, closed, client_cert, protocol, overload, other.",
            ["listener", "reason"],
            registry=r,
        )
        self.upstream_tls_handshakes = Counter(
            "fender_upstream_tls_handshakes_total",
            "TLS handshakes with https:// replicas, by upstream and session (full, or resumed from an "
            "earlier connection's session). Keep-alive pools make them rare: compare with "
            "fender_upstream_requests_total.",
            ["upstream", "session"],
            registry=r,
        )
        self.tls_certificate_reloads = Counter(
            "fender_tls_certificate_reloads_total",
            "Certificate files of a TLS listener that changed on disk, by listener and result (applied: new "
            "handshakes use them; refused: unusable, the previous pair stays).",
            ["listener", "result"],
            registry=r,
        )
        self.policy = Info(
            "fender_policy",
            "The running policy: its source file and version.",
            registry=r,
        )

        # Families of each policy module follow, one block per module, named
        # fender_<module>_..., e.g. fender_ratelimit_requests_total.

        # metrics: rate limits
        self.ratelimit_requests = Counter(
            "fender_ratelimit_requests_total",
            "Requests checked by a route's rate limits, by decision (allowed, limited, shadow_limited).",
            ["route", "decision"],
            registry=r,
        )
        self.ratelimit_keys = Gauge(
            "fender_ratelimit_keys",
            "Keys (buckets) held by a route's rate limits, summed over its limits.",
            ["route"],
            registry=r,
        )

        # metrics: bulkheads
        self.bulkhead_in_flight = Gauge(
            "fender_bulkhead_in_flight",
            "Requests of a route holding a bulkhead slot (in flight upstream, body still streaming).",
            ["route"],
            registry=r,
        )
        self.bulkhead_queued = Gauge(
            "fender_bulkhead_queued",
            "Requests of a route waiting in its bulkhead queue for a slot.",
            ["route"],
            registry=r,
        )
        self.bulkhead_rejected = Counter(
            "fender_bulkhead_rejected_total",
            "Requests a route's bulkhead turned away, by reason: bulkhead_full, bulkhead_timeout (both 503), client_gone (left while queued).",
            ["route", "reason"],
            registry=r,
        )
        self.bulkhead_queue_wait = Histogram(
            "fender_bulkhead_queue_wait_seconds",
            "Time requests spent in a route's bulkhead queue (only requests that had to queue).",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )

        # metrics: retries
        self.retry_attempts = Counter(
            "fender_retry_attempts_total",
            "Tries made by a route's retry layer (first tries included), by route and outcome "
            "(status class or fault reason).",
            ["route", "outcome"],
            registry=r,
        )
        self.retries = Counter(
            "fender_retries_total",
            "Retries started, by route and the retry_on condition that caused them.",
            ["route", "reason"],
            registry=r,
        )
        self.retry_budget_exhausted = Counter(
            "fender_retry_budget_exhausted_total",
            "Failures returned without a retry because the route's retry budget was spent.",
            ["route"],
            registry=r,
        )
        self.retries_skipped = Counter(
            "fender_retries_skipped_total",
            "Retryable failures returned as they were for another reason: deadline, not_replayable, "
            "not_idempotent, retry_after (the upstream asked for more time than the deadline leaves).",
            ["route", "reason"],
            registry=r,
        )
        self.retry_backoff = Counter(
            "fender_retry_backoff_seconds_total",
            "Time spent waiting between tries (backoff and honoured Retry-After), by route.",
            ["route"],
            registry=r,
        )

        # metrics: adaptive concurrency
        self.adaptive_limit = Gauge(
            "fender_adaptive_concurrency_limit",
            "A route's adaptive concurrency limit now (requests in flight it admits).",
            ["route"],
            registry=r,
        )
        self.adaptive_in_flight = Gauge(
            "fender_adaptive_concurrency_in_flight",
            "Requests in flight under a route's adaptive concurrency limit.",
            ["route"],
            registry=r,
        )
        self.adaptive_shed = Counter(
            "fender_adaptive_concurrency_shed_total",
            "Requests answered 503 concurrency_limited, by reason: queue_full (shed as the oldest waiter) "
            "or queue_timeout.",
            ["route", "reason"],
            registry=r,
        )

        # metrics: slow start
        self.replica_slow_starts = Counter(
            "fender_replica_slow_starts_total",
            "Slow starts begun: a replica came back into rotation (un-ejected, healthy again, undrained, new "
            "in a reload) on an upstream with slow_start.",
            ["upstream", "replica"],
            registry=r,
        )
        self.replica_slow_start_share = Gauge(
            "fender_replica_slow_start_share",
            "Share of its picks a replica keeps now: from 0.1 when it comes back to 1 at the end of slow_start.",
            ["upstream", "replica"],
            registry=r,
        )

        # metrics: hedged requests
        self.hedges_sent = Counter(
            "fender_hedges_sent_total",
            "Hedges sent: extra tries of a request whose try had not answered after the route's hedge delay.",
            ["route"],
            registry=r,
        )
        self.hedge_winners = Counter(
            "fender_hedge_winners_total",
            "Hedged tries decided, by which try's answer won: first (the hedge lost) or hedge.",
            ["route", "winner"],
            registry=r,
        )
        self.hedges_skipped = Counter(
            "fender_hedges_skipped_total",
            "Hedges not sent, by reason: budget (the hedge budget), retry_budget, deadline, not_idempotent, "
            "not_replayable (counted once per try when the request may not be hedged at all).",
            ["route", "reason"],
            registry=r,
        )
        self.hedge_delay = Gauge(
            "fender_hedge_delay_seconds",
            "The delay after which a slow try gets a hedge (the observed percentile or the fixed duration); "
            "0 before enough tries were seen.",
            ["route"],
            registry=r,
        )

        # metrics: fault injection
        self.faults_injected = Counter(
            "fender_faults_injected_total",
            "Faults a route's fault: section injected into tries (chaos drills), by route and kind: delay, abort.",
            ["route", "kind"],
            registry=r,
        )

        # metrics: circuit breakers
        self.breaker_state = Gauge(
            "fender_breaker_state",
            "State of each circuit breaker: 0 closed, 1 open, 2 half-open.",
            ["breaker"],
            registry=r,
        )
        self.breaker_transitions = Counter(
            "fender_breaker_transitions_total",
            "Circuit breaker state changes, by breaker and the states left and entered.",
            ["breaker", "from_state", "to_state"],
            registry=r,
        )
        self.breaker_rejected = Counter(
            "fender_breaker_rejected_total",
            "Requests answered without an upstream call because the breaker was open or its half-open "
            "trial permits were taken.",
            ["breaker"],
            registry=r,
        )
        self.breaker_calls = Counter(
            "fender_breaker_calls_total",
            "Calls recorded by each breaker, by outcome (success, failure, slow, slow_failure).",
            ["breaker", "outcome"],
            registry=r,
        )

        # metrics: failover and health checks
        self.replica_healthy = Gauge(
            "fender_replica_healthy",
            "1 when a replica is in rotation (passing active checks and not ejected), else 0.",
            ["upstream", "replica"],
            registry=r,
        )
        self.replica_ejections = Counter(
            "fender_replica_ejections_total",
            "Outlier ejections of a replica (consecutive failed tries), by upstream and replica.",
            ["upstream", "replica"],
            registry=r,
        )
        self.failovers = Counter(
            "fender_failovers_total",
            "Changes of the priority level serving an upstream, by from and to level (a priority, panic or none).",
            ["upstream", "from_level", "to_level"],
            registry=r,
        )
        self.upstream_active_priority = Gauge(
            "fender_upstream_active_priority",
            "Priority level serving the upstream now; -1 when none serves normally (no replica, or panic).",
            ["upstream"],
            registry=r,
        )
        self.upstream_panic = Gauge(
            "fender_upstream_panic",
            "1 while too few replicas are eligible and traffic is spread over all replicas (panic mode).",
            ["upstream"],
            registry=r,
        )
        self.health_check_duration = Histogram(
            "fender_health_check_duration_seconds",
            "Duration of active health-check probes, by upstream.",
            ["upstream"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.health_checks = Counter(
            "fender_health_checks_total",
            "Active health-check probes by upstream, replica and result (pass, fail, timeout, error).",
            ["upstream", "replica", "result"],
            registry=r,
        )

        # metrics: replicas from DNS
        self.dns_lookups = Counter(
            "fender_dns_lookups_total",
            "DNS lookups for an upstream's names (resolve: true, srv: and plain host names), by outcome: ok, "
            "nxdomain, empty, timeout, servfail, refused, unreachable or error.",
            ["upstream", "outcome"],
            registry=r,
        )
        self.dns_replicas = Gauge(
            "fender_dns_replicas",
            "Replicas of an upstream that come from DNS answers (entries with resolve: true or srv:) now.",
            ["upstream"],
            registry=r,
        )
        self.dns_answer_age = Gauge(
            "fender_dns_answer_age_seconds",
            "Age of the last good DNS answer in use for a name of an upstream (grows while lookups fail).",
            ["upstream", "name"],
            registry=r,
        )

        # metrics: response cache
        self.cache_requests = Counter(
            "fender_cache_requests_total",
            "GET/HEAD requests on caching routes by how the cache answered (hit, miss, stale, revalidated, "
            "coalesced, only_if_cached) and other methods passing it (bypass).",
            ["route", "result"],
            registry=r,
        )
        self.cache_stale_served = Counter(
            "fender_cache_stale_served_total",
            "Stale responses served, by reason (stale_while_revalidate, stale_if_error, max_stale).",
            ["route", "reason"],
            registry=r,
        )
        self.cache_revalidations = Counter(
            "fender_cache_revalidations_total",
            "Requests the cache sent upstream for a stored stale response, by result "
            "(not_modified, modified, unselected: a 304 matching no stored response, failed), and "
            "stored GET responses a HEAD 200 updated (head_updated) or made stale (head_stale).",
            ["route", "result"],
            registry=r,
        )
        self.cache_coalesced = Counter(
            "fender_cache_coalesced_total",
            "Requests that waited for another request's upstream response for the same URL instead of going upstream.",
            ["route"],
            registry=r,
        )
        self.cache_evictions = Counter(
            "fender_cache_evictions_total",
            "Stored URLs evicted (least recently used) to stay within cache.max_size.",
            registry=r,
        )
        self.cache_bytes = Gauge(
            "fender_cache_bytes",
            "Memory the response cache holds (headers, bodies and per-entry overhead), in bytes.",
            registry=r,
        )
        self.cache_entries = Gauge(
            "fender_cache_entries",
            "Responses stored in the cache (Vary variants counted separately).",
            registry=r,
        )
        self.cache_uncacheable_keys = Gauge(
            "fender_cache_uncacheable_keys",
            "URLs of a caching route known not to be storable (hit-for-miss, cache.uncacheable_ttl): their "
            "misses go upstream without waiting for each other.",
            ["route"],
            registry=r,
        )

        # metrics: operations (reload, checkpoints, drain)
        self.config_reloads = Counter(
            "fender_config_reloads_total",
            "Policy reload attempts, by trigger (file, signal, api, rollback, auto_rollback) and result "
            "(applied, unchanged, failed).",
            ["trigger", "result"],
            registry=r,
        )
        self.config_last_reload_success = Gauge(
            "fender_config_last_reload_success",
            "1 when the last reload attempt succeeded (or none was made), 0 when it failed.",
            registry=r,
        )
        self.config_last_reload_success.set(1)
        self.config_loaded_timestamp = Gauge(
            "fender_config_loaded_timestamp_seconds",
            "Unix time the running policy was applied.",
            registry=r,
        )
        self.config_rollbacks = Counter(
            "fender_config_rollbacks_total",
            "Returns to the previous policy, by reason (manual, unreachable).",
            ["reason"],
            registry=r,
        )
        self.config_differs_from_file = Gauge(
            "fender_config_differs_from_file",
            "1 when the running policy is not the one in the policy file (after a rollback or a failed reload).",
            registry=r,
        )
        self.checkpoint_writes = Counter(
            "fender_checkpoint_writes_total",
            "Checkpoint writes, by result (ok, failed).",
            ["result"],
            registry=r,
        )
        self.checkpoint_last_write = Gauge(
            "fender_checkpoint_last_write_timestamp_seconds",
            "Unix time of the last successful checkpoint write.",
            registry=r,
        )
        self.checkpoint_restores = Counter(
            "fender_checkpoint_restores_total",
            "Checkpoint reads at start, by result (restored, ignored, absent).",
            ["result"],
            registry=r,
        )
        self.draining = Gauge(
            "fender_draining",
            "1 while Fender drains after SIGTERM (readiness is 503), else 0.",
            registry=r,
        )

        # metrics: shared state (Redis fleet tier)
        self.redis_calls = Counter(
            "fender_redis_calls_total",
            "Calls to the shared Redis by operation (ratelimit, get, set, invalidate, lock, subscribe, purge) and "
            "outcome (ok, error, timeout, rejected: not attempted while the Redis breaker is open, "
            "invalid: a stored value that failed its checks, dropped: a background write skipped because "
            "too many were pending).",
            ["op", "outcome"],
            registry=r,
        )
        self.redis_call_duration = Histogram(
            "fender_redis_call_duration_seconds",
            "Duration of Redis calls that were attempted, by operation.",
            ["op"],
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
            registry=r,
        )
        self.cache_tier_hits = Counter(
            "fender_cache_tier_hits_total",
            "Cache lookups answered by a tier: l1 (this sidecar's memory) or l2 (the fleet's Redis). "
            "Counted only when state.backend is redis.",
            ["tier"],
            registry=r,
        )
        self.cache_invalidations = Counter(
            "fender_cache_invalidations_total",
            "Cache invalidations published to the fleet (sent) and applied from other sidecars (received).",
            ["direction"],
            registry=r,
        )
        self.cache_purges = Counter(
            "fender_cache_purges_total",
            "Cache purges applied by this sidecar, by kind (url, prefix, tag) and source (admin: "
            "POST /admin/cache/purge here, fleet: published by another sidecar).",
            ["kind", "source"],
            registry=r,
        )
        self.cache_purged = Counter(
            "fender_cache_purged_total",
            "Stored URLs dropped by purges, by kind (url, prefix, tag) and tier (l1: this sidecar's memory, "
            "l2: the fleet's Redis, counted by the sidecar that received the purge on its admin API).",
            ["kind", "tier"],
            registry=r,
        )
        for kind in ("url", "prefix", "tag"):
            for label in ("admin", "fleet"):
                self.cache_purges.labels(kind, label)
            for tier in ("l1", "l2"):
                self.cache_purged.labels(kind, tier)
        self.ratelimit_lease_renewals = Counter(
            "fender_ratelimit_lease_renewals_total",
            "Leases of global rate-limit tokens taken from the fleet's Redis bucket (one script call each).",
            ["route"],
            registry=r,
        )
        self.ratelimit_lease_tokens = Counter(
            "fender_ratelimit_lease_tokens_total",
            "Global rate-limit tokens leased by this sidecar (granted) and dropped unspent when their lease "
            "ran out (expired).",
            ["route", "outcome"],
            registry=r,
        )
        self.redis_fallback = Gauge(
            "fender_redis_fallback",
            "1 while Fender works without Redis (its Redis breaker is open: cache L1 only, global rate "
            "limits follow on_failure), else 0.",
            registry=r,
        )
        self.redis_pubsub = Gauge(
            "fender_redis_pubsub",
            "1 for the pub/sub Fender's invalidations and purges travel on while subscribed: mode plain "
            "(PUBLISH/SUBSCRIBE) or sharded (SPUBLISH/SSUBSCRIBE, Redis Cluster 7.0 and later); both 0 "
            "while the subscription is down.",
            ["mode"],
            registry=r,
        )
        for mode in ("plain", "sharded"):
            self.redis_pubsub.labels(mode)

        # metrics: HTTP/2 on the data listener (proxy/server/http2.py)
        self.http2_connections = Counter(
            "fender_http2_connections_total",
            "Client connections served as HTTP/2, by how it was chosen: prior_knowledge (h2c preface on "
            "the cleartext port) or alpn (h2 negotiated over TLS).",
            ["mode"],
            registry=r,
        )
        self.http2_goaway = Counter(
            "fender_http2_goaway_total",
            "GOAWAY frames Fender sent, by reason: drain, max_requests, idle, rapid_reset, control_flood, "
            "header_too_large, flow_control_stall, protocol_error.",
            ["reason"],
            registry=r,
        )
        self.http2_stream_resets = Counter(
            "fender_http2_stream_resets_total",
            "HTTP/2 streams Fender reset, by reason: refused (beyond max_concurrent_streams or after "
            "GOAWAY), malformed (RFC 9113 8.2 header rules; never forwarded), flow_control_stall (the "
            "stream's window stayed shut for send_timeout), aborted (the response failed midway); and "
            "client_reset, streams the client reset.",
            ["reason"],
            registry=r,
        )

        # metrics: upgraded connections (WebSocket and other Upgrade protocols)
        self.upgrades = Counter(
            "fender_upgrades_total",
            "Requests to switch protocols (Upgrade), by route, protocol and outcome: switched (the upstream "
            "answered 101 and a tunnel opened), declined (the upstream answered something else, relayed), "
            "not_allowed (refused by the route's upgrades list), failed (no answer from the upstream).",
            ["route", "protocol", "outcome"],
            registry=r,
        )
        self.tunnels_open = Gauge(
            "fender_tunnels_open",
            "Tunnels (upgraded connections) open now, by route.",
            ["route"],
            registry=r,
        )
        self.tunnel_bytes = Counter(
            "fender_tunnel_bytes_total",
            "Bytes relayed through tunnels, by route and direction (upstream: from the client to the upstream; "
            "downstream: from the upstream to the client). Added as they pass, at least every second.",
            ["route", "direction"],
            registry=r,
        )
        self.tunnel_duration = Histogram(
            "fender_tunnel_duration_seconds",
            "Lifetime of tunnels from the 101 to their close, by route.",
            ["route"],
            buckets=(0.1, 1, 10, 60, 300, 900, 1800, 3600, 7200, 21600),
            registry=r,
        )
        # Distributed tracing (proxy/tracing/), present only with a tracing: section in use.
        self.trace_spans_exported = Counter(
            "fender_trace_spans_exported_total",
            "Spans the OTLP collector accepted.",
            registry=r,
        )
        self.trace_spans_dropped = Counter(
            "fender_trace_spans_dropped_total",
            "Spans never exported, by reason: queue_full (the export queue was at tracing.queue_size) or "
            "export_failed (the collector refused or could not be reached, after retries).",
            ["reason"],
            registry=r,
        )

    def active_count(self, route: str) -> ActiveCount:
        """The in-flight counter of a route (created once per route name, exported by a gauge function)."""
        count = self._active_counts.get(route)
        if count is None:
            count = self._active_counts[route] = ActiveCount()
            self.in_flight.labels(route).set_function(lambda: count.value)
        return count


class FastCounter:
    """A pre-bound counter child for the request path: ``inc()`` adds 1 to its value directly.

    prometheus-client's ``Counter.inc`` checks on every call that the child has
    its label values and that the amount is not negative, and handles exemplars;
    for a child bound once at load and always incremented by 1 none of that can
    fail, and it costs about three times the increment. The sample is the same
    object, so scrapes see exactly what ``Counter.inc`` would have produced.
    """

    __slots__ = ("inc",)

    def __init__(self, child) -> None:
        child._raise_if_not_observable()  # a parent (missing labels) fails here, at load
        self.inc = _add_one(child._value)


class FastHistogram:
    """A pre-bound histogram child for the request path: ``observe()`` without per-call checks.

    Same sample values as ``Histogram.observe`` (sum, then the first bucket
    whose upper bound is >= the value, found by bisection instead of a linear scan).
    """

    __slots__ = ("_sum", "_sum_direct", "_bucket_incs", "_bounds")

    def __init__(self, child) -> None:
        child._raise_if_not_observable()
        self._sum = child._sum
        # Our own value class: add to its float in place (no call); another one: its inc().
        self._sum_direct = type(child._sum) is _LoopValue
        self._bucket_incs = [_add_one(bucket) for bucket in child._buckets]
        self._bounds = child._upper_bounds

    def observe(self, amount: float) -> None:
        if self._sum_direct:
            self._sum._value += amount
        else:
            self._sum.inc(amount)
        bounds = self._bounds  # ends with +Inf: any number finds its bucket
        index = bisect_left(bounds, amount)
        if amount <= bounds[index]:  # False only for NaN, which lands nowhere, as with Histogram.observe
            self._bucket_incs[index]()


class ActiveCount:
    """A plain in-flight counter, read by its gauge only when Prometheus scrapes.

    Two gauge updates per request cost more than the rest of the bookkeeping;
    an integer attribute costs next to nothing. One per route name, shared by
    the runtimes of successive policy loads, so requests finishing on an old
    runtime after a reload are still counted.
    """

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0

    def inc(self) -> None:
        self.value += 1

    def dec(self) -> None:
        self.value -= 1


class RouteMetrics:
    """Label children of one route, bound when the policy loads."""

    __slots__ = ("_requests", "_metrics", "_route", "duration", "in_flight", "_local")

    def __init__(self, metrics: Metrics, route: str) -> None:
        self._metrics = metrics
        self._route = route
        self._requests: dict[tuple[str, int], object] = {}
        self.duration = FastHistogram(metrics.request_duration.labels(route))
        self.in_flight = metrics.active_count(route)
        self._local: dict[str, object] = {}

    def request_counter(self, method: str, status: int):
        key = (method, status // 100)
        child = self._requests.get(key)
        if child is None:
            label_method = method if method in KNOWN_METHODS else "OTHER"
            status_class = STATUS_CLASSES[min(max(status // 100, 1), 5) - 1]
            child = FastCounter(self._metrics.requests.labels(self._route, label_method, status_class))
            if len(self._requests) < 64:
                self._requests[key] = child
        return child

    def local(self, reason: str):
        child = self._local.get(reason)
        if child is None:
            child = self._local[reason] = self._metrics.local_responses.labels(self._route, reason)
        return child


class UpstreamMetrics:
    """Label children of one upstream, bound when the policy loads."""

    __slots__ = ("_metrics", "name", "duration", "_errors", "_outcomes")

    def __init__(self, metrics: Metrics, upstream: str) -> None:
        self._metrics = metrics
        self.name = upstream
        self.duration = FastHistogram(metrics.upstream_duration.labels(upstream))
        self._errors: dict[str, object] = {}
        self._outcomes: dict[tuple[str, str], object] = {}

    def error(self, reason: str):
        child = self._errors.get(reason)
        if child is None:
            child = self._errors[reason] = self._metrics.upstream_errors.labels(self.name, reason)
        return child

    def outcome(self, replica: str, outcome: str):
        key = (replica, outcome)
        child = self._outcomes.get(key)
        if child is None:
            child = self._metrics.upstream_requests.labels(self.name, replica, outcome)
            child = self._outcomes[key] = FastCounter(child)
        return child

    def forget(self, replica: str) -> None:
        """DNS removed ``replica``: drop its series (pod addresses come and go; series must not pile up)."""
        for key in [k for k in self._outcomes if k[0] == replica]:
            del self._outcomes[key]
            with contextlib.suppress(KeyError):
                self._metrics.upstream_requests.remove(self.name, *key)
        for kind in ("in_use", "idle"):
            with contextlib.suppress(KeyError):
                self._metrics.pool_connections.remove(self.name, replica, kind)


class TunnelMetrics:
    """Label children of one route's upgrades and tunnels, bound on first use (most routes never tunnel)."""

    __slots__ = ("_metrics", "_route", "_children")

    def __init__(self, metrics: Metrics, route: str) -> None:
        self._metrics = metrics
        self._route = route
        self._children: tuple | None = None

    def upgrade(self, protocol: str, outcome: str):
        return self._metrics.upgrades.labels(self._route, protocol, outcome)

    def _bound(self) -> tuple:
        children = self._children
        if children is None:
            m, route = self._metrics, self._route
            children = self._children = (
                m.tunnels_open.labels(route),
                m.tunnel_bytes.labels(route, "upstream"),
                m.tunnel_bytes.labels(route, "downstream"),
                m.tunnel_duration.labels(route),
            )
        return children

    @property
    def open(self):
        return self._bound()[0]

    def add_bytes(self, upstream: int, downstream: int) -> None:
        _, up, down, _ = self._bound()
        if upstream:
            up.inc(upstream)
        if downstream:
            down.inc(downstream)

    def closed(self, seconds: float) -> None:
        self._bound()[3].observe(seconds)
