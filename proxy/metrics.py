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

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, disable_created_metrics

# The *_created series double the scrape size and no dashboard of ours uses them.
disable_created_metrics()

# Methods outside this set are counted as OTHER, so clients cannot invent series.
KNOWN_METHODS = ("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "CONNECT", "TRACE")
STATUS_CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx")

# Latency buckets for a sidecar: sub-millisecond to the default route timeout.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

# Why Fender answered a request itself (the X-Fender-Error header carries the same word).
LOCAL_REASONS = (
    "no_route",
    "body_too_large",
    "bad_request",
    "connect_failure",
    "connect_timeout",
    "pool_overflow",
    "reset",
    "reset_mid_body",
    "timeout",
    "bad_response",
    "request_body_timeout",
)


class Metrics:
    """The registry and every metric family. One instance per proxy process."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "fender_requests_total",
            "Requests answered, by route, method and status class (including local answers).",
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
        self.policy = Info(
            "fender_policy",
            "The running policy: its source file and version.",
            registry=r,
        )

        # Families of each policy module follow, one block per module, named
        # fender_<module>_..., e.g. fender_ratelimit_requests_total.

        # metrics: rate limits

        # metrics: bulkheads

        # metrics: retries

        # metrics: circuit breakers

        # metrics: failover and health checks

        # metrics: response cache

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


class RouteMetrics:
    """Label children of one route, bound when the policy loads."""

    __slots__ = ("_requests", "_metrics", "_route", "duration", "in_flight", "_local")

    def __init__(self, metrics: Metrics, route: str) -> None:
        self._metrics = metrics
        self._route = route
        self._requests: dict[tuple[str, int], object] = {}
        self.duration = metrics.request_duration.labels(route)
        self.in_flight = metrics.in_flight.labels(route)
        self._local: dict[str, object] = {}

    def request_counter(self, method: str, status: int):
        key = (method, status // 100)
        child = self._requests.get(key)
        if child is None:
            label_method = method if method in KNOWN_METHODS else "OTHER"
            status_class = STATUS_CLASSES[min(max(status // 100, 1), 5) - 1]
            child = self._metrics.requests.labels(self._route, label_method, status_class)
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
        self.duration = metrics.upstream_duration.labels(upstream)
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
            child = self._outcomes[key] = self._metrics.upstream_requests.labels(self.name, replica, outcome)
        return child
