"""A loaded policy turned into the objects the data path runs.

Built once per policy load: the router, each route's pipeline, each upstream's
replica pools, and the metric children they use. The data plane reads one
Runtime reference per request, so swapping the reference swaps the policy.

Reload hand-over
----------------
A reload builds a new Runtime next to the running one, passing the running
one as ``previous``. Objects that own state are obtained through
:func:`keep` (``keep(ctx, key, settings, build)``): when the previous runtime
holds an object under the same key built from equal settings, that very
object is reused (its state, pools and background tasks carry on);
otherwise ``build()`` makes a new one, and if the new object has a
``carry_over(old)`` method it is called with the previous object of that key,
so a module can take over what still applies (e.g. a cache keeping entries
when only its size changed). ``carry_over`` runs during the build and must
only change the new object (the build may still fail); a fresh object's
``take_over()`` (sync or async) runs once the whole runtime started, just
before it goes live, for hand-overs that touch the old object (a bulkhead's
slots, connection pools, stopping the old health checks). Upstreams go through the same mechanism, keyed
``("upstream", name)`` with their options as settings.

Modules that keep their objects in a registry dict in ``ctx.shared`` (e.g.
``ctx.shared.setdefault("breaker", {})``) get the same without calling
:func:`keep`: during a reload that dict starts with the previous runtime's
entries (see :class:`Registry`), so an object looked up under a key that
includes its settings is reused; an entry the module overwrites gets
``carry_over(old)`` called if it has one; unused previous entries are dropped.
A non-dict entry of ``ctx.shared`` with a ``carry_over`` method receives the
previous entry of that module key.

The old runtime keeps serving the requests that already hold it; it is
retired (its objects that the new runtime does not use are closed) once its
in-flight count drops to zero, or after the drain timeout.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Callable, Hashable
from typing import Any, TypeVar

from proxy.clock import SYSTEM_CLOCK, Clock
from proxy.dataplane.accesslog import AccessLog
from proxy.dataplane.forward import UpstreamRuntime
from proxy.dataplane.headers import TrustedProxies
from proxy.dataplane.pipeline import TRACER_KEY, Handler, LayerContext, build_pipeline
from proxy.dataplane.router import IndexedRouter, Router, build_router, compile_match
from proxy.discovery.entries import Dns, uses_dns
from proxy.metrics import Metrics, RouteMetrics, TunnelMetrics
from proxy.ops.checkpoint import CheckpointProviders

log = logging.getLogger("fender")

# Bodies up to this size are read whole before the upstream request, so the
# request goes out in one write and can be replayed; larger ones stream.
BUFFER_BODY_LIMIT = 64 * 1024

# Reserved keys in ``Runtime.shared`` (module keys are module names, so they never clash).
HANDOVER_KEY = "fender.handover"
CHECKPOINTS_KEY = "fender.checkpoints"
_RESERVED = (HANDOVER_KEY, CHECKPOINTS_KEY, TRACER_KEY)

T = TypeVar("T")


class Handover:
    """The stateful objects of one runtime, by key, with the settings each was built from."""

    def __init__(self, previous: Handover | None = None) -> None:
        self.previous = previous
        self.objects: dict[Hashable, tuple[Any, Any]] = {}
        self.kept = 0
        self.fresh: list[Any] = []

    def keep(self, key: Hashable, settings: Any, build: Callable[[], T]) -> T:
        entry = self.objects.get(key)
        if entry is not None:
            return entry[1]  # asked again within the same build (an object shared by routes)
        old = self.previous.objects.get(key) if self.previous is not None else None
        if old is not None and old[0] == settings:
            obj = old[1]
            self.kept += 1
        else:
            obj = build()
            if old is not None:
                carry = getattr(obj, "carry_over", None)
                if carry is not None:
                    carry(old[1])
            self.fresh.append(obj)
        self.objects[key] = (settings, obj)
        return obj

    def owned_ids(self) -> set[int]:
        return {id(obj) for _, obj in self.objects.values()}


class Registry(dict):
    """A module's registry in ``Runtime.shared`` during a reload, pre-filled with the previous entries.

    Modules keep per-runtime registries as dicts in ``ctx.shared`` (e.g.
    ``ctx.shared.setdefault("breaker", {})``). During a reload the new
    runtime's registry starts with the previous runtime's entries, so a module
    that looks an object up under a key that includes its settings (``get``,
    ``[]``, ``in``, ``setdefault``) finds the previous object and reuses it,
    state and all. An entry the module overwrites is replaced (and the new
    value's ``carry_over(old)`` is called if it has one); previous entries that
    nobody asked for are dropped once the build is done.
    """

    def __init__(self, previous: dict) -> None:
        super().__init__(previous)
        self._seeded = set(previous)
        self._hits: set = set()
        self._replaced: dict = {}

    def _hit(self, key) -> None:
        if key in self._seeded and key not in self._replaced:
            self._hits.add(key)

    def get(self, key, default=None):
        self._hit(key)
        return super().get(key, default)

    def __getitem__(self, key):
        self._hit(key)
        return super().__getitem__(key)

    def __contains__(self, key) -> bool:
        self._hit(key)
        return super().__contains__(key)

    def setdefault(self, key, default=None):
        self._hit(key)
        return super().setdefault(key, default)

    def __setitem__(self, key, value) -> None:
        if key in self._seeded and key not in self._hits and key not in self._replaced:
            self._replaced[key] = super().__getitem__(key)
        super().__setitem__(key, value)

    # Iterating shows only what this build uses: previous entries appear once looked up, so
    # a module counting or naming its objects (e.g. to avoid duplicate names) is not misled.
    def _live(self, key) -> bool:
        return key not in self._seeded or key in self._hits or key in self._replaced

    def keys(self):
        return [k for k in dict.keys(self) if self._live(k)]

    def values(self):
        return [v for k, v in dict.items(self) if self._live(k)]

    def items(self):
        return [(k, v) for k, v in dict.items(self) if self._live(k)]

    def __iter__(self):
        return iter(self.keys())

    def __len__(self) -> int:
        return len(self.keys())

    def settle(self) -> dict:
        """The registry as the build left it, as a plain dict; calls ``carry_over`` on replaced entries."""
        out = {}
        for key, value in dict.items(self):
            if not self._live(key):
                continue  # a previous entry the new policy no longer uses
            out[key] = value
            old = self._replaced.get(key)
            carry = getattr(value, "carry_over", None)
            if old is not None and old is not value and carry is not None:
                carry(old)
        return out

    @property
    def taken_over(self) -> int:
        return len(self._hits)


def keep(ctx: LayerContext, key: Hashable, settings: Any, build: Callable[[], T]) -> T:
    """The object for ``key``: the previous runtime's when ``settings`` are equal, else ``build()``.

    Policy modules call this from ``build_layer`` for every object that owns
    state (a breaker, a bucket table, a cache), with a key naming it (e.g.
    ``("breaker", route.name)``) and the options it is built from (pydantic
    models compare by value). Outside a Runtime (a bare LayerContext in a unit
    test) it simply builds.
    """
    handover = ctx.shared.get(HANDOVER_KEY)
    if handover is None:
        return build()
    return handover.keep(key, settings, build)


def register_checkpoint(
    ctx: LayerContext, name: str, snapshot: Callable[[], dict], restore: Callable[[dict], None]
) -> None:
    """Have ``snapshot()`` saved in each checkpoint and ``restore(data)`` called with it at start.

    See :mod:`proxy.ops.checkpoint` for the contract. Without a Runtime this does nothing.
    """
    providers = ctx.shared.get(CHECKPOINTS_KEY)
    if providers is not None:
        providers.register(name, snapshot, restore)


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
        self.upgrades = frozenset(options.upgrades)
        self.upgrade_idle_timeout = options.upgrade_idle_timeout
        # rewrite_prefix: (matched prefix, replacement) as bytes, or None.
        self.rewrite = (
            (options.match.path_prefix.encode(), options.rewrite_prefix.encode())
            if options.rewrite_prefix is not None
            else None
        )
        self.upgrade_metrics = TunnelMetrics(ctx.metrics, options.name)
        self.metrics = RouteMetrics(ctx.metrics, options.name)
        self.pipeline: Handler = build_pipeline(options, ctx)


class Runtime:
    def __init__(
        self,
        policy,
        metrics: Metrics,
        source: str = "",
        clock: Clock = SYSTEM_CLOCK,
        previous: Runtime | None = None,
    ) -> None:
        self.policy = policy
        self.source = source
        self.metrics = metrics
        self.clock = clock
        # Requests that matched a route of this runtime and have not finished (kept by the data plane).
        self.active = 0
        # Set while a reload waits for this runtime's last request; the data plane then calls request_done().
        self.idle_waiter: asyncio.Future | None = None
        self.handover = Handover(previous.handover if previous is not None else None)
        self.checkpoints = CheckpointProviders()
        # Objects layers share across routes (e.g. one breaker per upstream), by module.
        self.shared: dict = {HANDOVER_KEY: self.handover, CHECKPOINTS_KEY: self.checkpoints}
        if previous is not None:
            for key, value in previous.shared.items():
                if key not in _RESERVED and type(value) is dict:
                    self.shared[key] = Registry(value)
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
                lambda n=name, u=up: UpstreamRuntime(n, u, metrics, clock, dns),
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
        tracing = getattr(policy, "tracing", None)
        if tracing is not None:
            # One tracer (sampler and exporter) per tracing section; a reload that keeps it keeps the queue.
            self.shared[TRACER_KEY] = self.handover.keep(
                ("tracing",), tracing, lambda: _tracer(tracing, metrics, clock)
            )
        self.routes = [
            RouteRuntime(r, LayerContext(metrics, self.upstreams[r.upstream], policy, clock, self.shared))
            for r in policy.routes
        ]
        self.router: Router[RouteRuntime] | IndexedRouter[RouteRuntime] = build_router(
            [(compile_match(r.options.match), r) for r in self.routes]
        )
        self.trusted = TrustedProxies(policy.server.trusted_proxies, policy.server.trusted_hops)
        # None when off (the default): the data path then pays one truth test per request, as before.
        self.access_log = AccessLog(policy.server.access_log_format) if policy.server.access_log else None
        if previous is not None:
            self._generic_carry_over(previous)
        self.handover.previous = None  # do not keep a chain of old runtimes alive

    def _generic_carry_over(self, previous: Runtime) -> None:
        kept = self.handover.owned_ids()
        for key, obj in list(self.shared.items()):
            if key in _RESERVED or id(obj) in kept:
                continue
            if isinstance(obj, Registry):
                self.handover.kept += obj.taken_over
                self.shared[key] = obj.settle()
                continue
            old = previous.shared.get(key)
            carry = getattr(obj, "carry_over", None)
            if old is not None and old is not obj and carry is not None:
                carry(old)

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
        for key, obj in self.shared.items():
            if key in _RESERVED:
                continue
            objects.append(obj)
            if type(obj) is dict:
                objects.extend(obj.values())  # a module's registry: its entries own state too
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


def _tracer(options, metrics: Metrics, clock: Clock):
    from proxy.tracing.tracer import Tracer  # imported only by policies that trace

    return Tracer(options, metrics, clock)


async def _call_if_present(obj: Any, name: str) -> None:
    method = getattr(obj, name, None)
    if method is None:
        return
    result = method()
    if inspect.isawaitable(result):
        await result
