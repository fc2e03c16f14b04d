"""A loaded policy turned into the objects the data path runs.

Built once per policy load: the router, each route's pipeline, each upstream's
replica pools, and the metric children they use. The data plane reads one
Runtime reference per request, so swapping the reference swaps the policy.

Reload hand-over
----------------
A reload builds a new Runtime next to the running one, passing the running
one as ``previous``. Every object that owns state is obtained through one
mechanism, :class:`proxy.kernel.handover.Handover` (``ctx.keep(key, settings,
build)`` in a policy): unchanged settings keep the very object, changed ones
build a new object that may ``carry_over`` from the old. Upstreams go through
the same mechanism, keyed ``("upstream", name)`` with their options as settings.

The old runtime keeps serving the requests that already hold it; it is
retired (its objects that the new runtime does not use are closed) once its
in-flight count drops to zero, or after the drain timeout.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
from typing import Any

from proxy.clock import SYSTEM_CLOCK, Clock
from proxy.cluster.dns.entries import Dns, uses_dns
from proxy.cluster.upstream import UpstreamRuntime
from proxy.config.models import Policy, Route
from proxy.dataplane.accesslog import AccessLog
from proxy.dataplane.headers import TrustedProxies
from proxy.dataplane.pipeline import build_pipeline
from proxy.dataplane.router import IndexedRouter, Router, build_router, compile_match
from proxy.kernel.exchange import Handler
from proxy.kernel.handover import CheckpointProviders, Handover
from proxy.metrics import Metrics, RouteMetrics, TunnelMetrics
from proxy.policies.context import LayerContext
from proxy.tracing.options import TracingOptions
from proxy.tracing.tracer import Tracer

log = logging.getLogger("fender")

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
        "upgrades",
        "upgrade_idle_timeout",
        "rewrite",
        "upgrade_metrics",
    )

    def __init__(self, options: Route, ctx: LayerContext, tracer: Tracer | None = None) -> None:
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
        self.upgrades = frozenset(options.upgrades)
        self.upgrade_idle_timeout = options.upgrade_idle_timeout
        # rewrite_prefix: (matched prefix, replacement) as bytes, or None.
        prefix = options.match.path_prefix  # always given with rewrite_prefix (Route refuses it alone)
        self.rewrite = (
            (prefix.encode(), options.rewrite_prefix.encode())
            if options.rewrite_prefix is not None and prefix is not None
            else None
        )
        self.upgrade_metrics = TunnelMetrics(ctx.metrics, options.name)
        self.metrics = RouteMetrics(ctx.metrics, options.name)
        self.pipeline: Handler = build_pipeline(options, ctx, tracer)


class Runtime:
    def __init__(
        self,
        policy,
        metrics: Metrics,
        source: str = "",
        clock: Clock = SYSTEM_CLOCK,
        previous: Runtime | None = None,
    ) -> None:
        self.policy: Policy = policy
        self.source = source
        self.metrics = metrics
        self.clock = clock
        # Requests that matched a route of this runtime and have not finished (kept by the data plane).
        self.active = 0
        # Set while a reload waits for this runtime's last request; the data plane then calls request_done().
        self.idle_waiter: asyncio.Future | None = None
        self.handover: Handover = Handover(previous.handover if previous is not None else None)
        self.checkpoints = CheckpointProviders()
        # Stateful objects by kind and name, for the admin API (bulkhead/checkout, cache/store, ...).
        self.exposed: dict[str, dict[str, Any]] = {}
        # One resolver and name cache per dns: section; an upstream with names is rebuilt (keeping
        # its DNS answers, see UpstreamRuntime.carry_over) when that section changes.
        dns_options = policy.dns
        dns = (
            self.handover.keep(("dns",), dns_options, lambda: Dns(dns_options, clock, metrics))
            if any(uses_dns(up) for up in policy.upstreams.values())
            else None
        )
        self.upstreams = {
            name: self.handover.keep(
                ("upstream", name),
                (up, dns_options) if uses_dns(up) else up,
                functools.partial(UpstreamRuntime, name, up, metrics, clock, dns),
            )
            for name, up in policy.upstreams.items()
        }
        # Replica health and ejections go into checkpoints (matched by upstream name and host:port).
        for name, upstream in self.upstreams.items():
            if upstream.options.health_check is None and upstream.options.outlier_detection is None:
                continue  # nothing learned about its replicas that a restart could lose
            self.checkpoints.register(
                f"upstream/{name}", upstream.checkpoint_snapshot, upstream.checkpoint_restore
            )
        tracing: TracingOptions | None = policy.tracing
        # One tracer (sampler and exporter) per tracing section; a reload that keeps it keeps the queue.
        self.tracer = (
            None
            if tracing is None
            else self.handover.keep(("tracing",), tracing, lambda: Tracer(tracing, metrics, clock))
        )
        self.routes = [
            RouteRuntime(
                r,
                LayerContext(
                    metrics,
                    self.upstreams[r.upstream],
                    policy,
                    clock,
                    handover=self.handover,
                    checkpoints=self.checkpoints,
                    exposed=self.exposed,
                ),
                self.tracer,
            )
            for r in policy.routes
        ]
        self.router: Router[RouteRuntime] | IndexedRouter[RouteRuntime] = build_router(
            [(compile_match(r.options.match), r) for r in self.routes]
        )
        self.trusted = TrustedProxies(policy.server.trusted_proxies, policy.server.trusted_hops)
        # None when off (the default): the data path then pays one truth test per request, as before.
        self.access_log = AccessLog(policy.server.access_log_format) if policy.server.access_log else None
        self.handover.previous = None  # do not keep a chain of old runtimes alive

    @property
    def kept_objects(self) -> int:
        """How many stateful objects this runtime took over unchanged from the previous one."""
        return self.handover.kept

    async def start(self) -> None:
        """Start background work (health checks, refreshers) of the objects this runtime built.

        Objects taken over from the previous runtime are already running.
        """
        fresh = {id(obj) for obj in self.handover.fresh}
        for upstream in self.upstreams.values():
            if id(upstream) in fresh:
                await upstream.start()
        for obj in self.handover.fresh:
            if not isinstance(obj, UpstreamRuntime):
                await _call_if_present(obj, "start")
        # Everything started: objects replacing a previous one with other settings now take over
        # what is live there (bulkhead slots and queue, connection pools, stopping old health checks).
        for obj in self.handover.fresh:
            await _call_if_present(obj, "take_over")

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until no request uses this runtime any more; False if ``timeout`` passed first."""
        if self.active == 0:
            return True
        loop = asyncio.get_running_loop()
        self.idle_waiter = loop.create_future()
        try:
            async with asyncio.timeout(timeout):
                await asyncio.shield(self.idle_waiter)
        except TimeoutError:
            return self.active == 0
        return True

    def request_done(self) -> None:
        """Called by the data plane when a request of this runtime ends and others may be waiting."""
        idle = self.idle_waiter
        if idle is not None and self.active == 0 and not idle.done():
            idle.set_result(None)

    def _objects(self) -> list[Any]:
        objects = [obj for _, obj in self.handover.objects.values()]
        for named in self.exposed.values():
            objects.extend(named.values())  # exposed for the admin API; some own tasks too
        return objects

    def owned_ids(self) -> set[int]:
        """Identities of the stateful objects this runtime uses (for closing only unused ones)."""
        return {id(obj) for obj in self._objects()}

    async def retire(self, live: set[int]) -> None:
        """Close this runtime's objects except those in ``live`` (used by runtimes still serving)."""
        closed: set[int] = set()
        for obj in self._objects():
            if id(obj) in live or id(obj) in closed:
                continue
            closed.add(id(obj))
            try:
                await _call_if_present(obj, "close")
            except Exception:  # pragma: no cover - one module's close must not stop the others
                log.exception("closing %r failed", obj)

    async def close(self) -> None:
        await self.retire(set())


async def _call_if_present(obj: Any, name: str) -> None:
    method = getattr(obj, name, None)
    if method is None:
        return
    result = method()
    if inspect.isawaitable(result):
        await result
