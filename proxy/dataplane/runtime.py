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
when only its size changed). Upstreams go through the same mechanism, keyed
``("upstream", name)`` with their options as settings.

For entries of ``ctx.shared`` (per-module objects) that were not obtained
through :func:`keep`, the same rule applies generically after the build: a
new entry with a ``carry_over`` method receives the previous entry of that
module key.

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
from proxy.dataplane.forward import UpstreamRuntime
from proxy.dataplane.headers import TrustedProxies
from proxy.dataplane.pipeline import Handler, LayerContext, build_pipeline
from proxy.dataplane.router import Router, compile_match
from proxy.metrics import Metrics, RouteMetrics
from proxy.ops.checkpoint import CheckpointProviders

log = logging.getLogger("fender")

# Bodies up to this size are read whole before the upstream request, so the
# request goes out in one write and can be replayed; larger ones stream.
BUFFER_BODY_LIMIT = 64 * 1024

# Reserved keys in ``Runtime.shared`` (module keys are module names, so they never clash).
HANDOVER_KEY = "fender.handover"
CHECKPOINTS_KEY = "fender.checkpoints"

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
    __slots__ = ("name", "options", "pipeline", "metrics", "max_body", "idle_timeout", "timeout", "upstream")

    def __init__(self, options, ctx: LayerContext) -> None:
        upstream = ctx.upstream
        self.name = options.name
        self.options = options
        self.upstream = upstream
        self.max_body = options.max_body
        self.idle_timeout = options.idle_timeout
        self.timeout = options.timeout
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
        self._idle: asyncio.Future | None = None
        self.handover = Handover(previous.handover if previous is not None else None)
        self.checkpoints = CheckpointProviders()
        # Objects layers share across routes (e.g. one breaker per upstream), by module.
        self.shared: dict = {HANDOVER_KEY: self.handover, CHECKPOINTS_KEY: self.checkpoints}
        self.upstreams = {
            name: self.handover.keep(
                ("upstream", name), up, lambda n=name, u=up: UpstreamRuntime(n, u, metrics)
            )
            for name, up in policy.upstreams.items()
        }
        self.routes = [
            RouteRuntime(r, LayerContext(metrics, self.upstreams[r.upstream], policy, clock, self.shared))
            for r in policy.routes
        ]
        self.router: Router[RouteRuntime] = Router([(compile_match(r.options.match), r) for r in self.routes])
        self.trusted = TrustedProxies(policy.server.trusted_proxies)
        self.access_log = policy.server.access_log
        if previous is not None:
            self._generic_carry_over(previous)
        self.handover.previous = None  # do not keep a chain of old runtimes alive

    def _generic_carry_over(self, previous: Runtime) -> None:
        kept = self.handover.owned_ids()
        for key, obj in self.shared.items():
            if key in (HANDOVER_KEY, CHECKPOINTS_KEY) or id(obj) in kept:
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

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until no request uses this runtime any more; False if ``timeout`` passed first."""
        if self.active == 0:
            return True
        loop = asyncio.get_running_loop()
        self._idle = loop.create_future()
        try:
            async with asyncio.timeout(timeout):
                await asyncio.shield(self._idle)
        except TimeoutError:
            return self.active == 0
        return True

    def request_done(self) -> None:
        """Called by the data plane when a request of this runtime ends and others may be waiting."""
        idle = self._idle
        if idle is not None and self.active == 0 and not idle.done():
            idle.set_result(None)

    def owned_ids(self) -> set[int]:
        """Identities of the stateful objects this runtime uses (for closing only unused ones)."""
        ids = self.handover.owned_ids()
        ids.update(id(obj) for key, obj in self.shared.items() if key not in (HANDOVER_KEY, CHECKPOINTS_KEY))
        return ids

    async def retire(self, live: set[int]) -> None:
        """Close this runtime's objects except those in ``live`` (used by runtimes still serving)."""
        objects = [obj for _, obj in self.handover.objects.values()]
        objects += [obj for key, obj in self.shared.items() if key not in (HANDOVER_KEY, CHECKPOINTS_KEY)]
        closed: set[int] = set()
        for obj in objects:
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
