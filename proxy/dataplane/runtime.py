"""A loaded policy turned into the objects the data path runs.

Built once per policy load: the router, each route's pipeline, each upstream's
replica pools, and the metric children they use. The data plane reads one
Runtime reference per request, so swapping the reference swaps the policy.
"""

from __future__ import annotations

from proxy.clock import SYSTEM_CLOCK, Clock
from proxy.dataplane.forward import UpstreamRuntime
from proxy.dataplane.headers import TrustedProxies
from proxy.dataplane.pipeline import Handler, LayerContext, build_pipeline
from proxy.dataplane.router import Router, compile_match
from proxy.metrics import Metrics, RouteMetrics

# Bodies up to this size are read whole before the upstream request, so the
# request goes out in one write and can be replayed; larger ones stream.
BUFFER_BODY_LIMIT = 64 * 1024


class RouteRuntime:
    __slots__ = (
        "name",
        "options",
        "pipeline",
        "metrics",
        "max_body",
        "idle_timeout",
        "timeout",
        "upstream",
        "buffer_limit",
        "explain",
    )

    def __init__(self, options, ctx: LayerContext) -> None:
        upstream = ctx.upstream
        self.name = options.name
        self.options = options
        self.upstream = upstream
        self.max_body = options.max_body
        self.idle_timeout = options.idle_timeout
        self.timeout = options.timeout
        # Bodies up to this size are read whole: a route with retries keeps up to max_replay_body for replay.
        retry = getattr(options, "retry", None)
        self.buffer_limit = (
            max(BUFFER_BODY_LIMIT, retry.max_replay_body) if retry is not None else BUFFER_BODY_LIMIT
        )
        self.explain = getattr(options, "explain", False)
        self.metrics = RouteMetrics(ctx.metrics, options.name)
        self.pipeline: Handler = build_pipeline(options, ctx)


class Runtime:
    def __init__(self, policy, metrics: Metrics, source: str = "", clock: Clock = SYSTEM_CLOCK) -> None:
        self.policy = policy
        self.source = source
        self.metrics = metrics
        self.clock = clock
        # Objects layers share across routes (e.g. one breaker per upstream), by module.
        self.shared: dict = {}
        self.upstreams = {
            name: UpstreamRuntime(name, up, metrics, clock) for name, up in policy.upstreams.items()
        }
        self.routes = [
            RouteRuntime(r, LayerContext(metrics, self.upstreams[r.upstream], policy, clock, self.shared))
            for r in policy.routes
        ]
        self.router: Router[RouteRuntime] = Router([(compile_match(r.options.match), r) for r in self.routes])
        self.trusted = TrustedProxies(policy.server.trusted_proxies, policy.server.trusted_hops)
        self.access_log = policy.server.access_log

    async def start(self) -> None:
        """Start background work (health checks, refreshers) before the runtime serves."""
        for upstream in self.upstreams.values():
            await upstream.start()

    async def close(self) -> None:
        for upstream in self.upstreams.values():
            await upstream.close()
