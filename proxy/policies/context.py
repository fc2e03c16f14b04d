"""What a policy's layer factory gets when the policy loads, and the shape every policy has.

Each policy is a package under ``proxy/policies/`` with an ``options`` module (the route's YAML
section, imported by the config models) and a ``build_layer(route, next_handler, ctx)`` of the
:class:`BuildLayer` shape: it returns the handler wrapping ``next_handler`` for this route, or
None when the route does not use the policy. :data:`proxy.policies.chain.ORDER` lists them,
outermost first; the pipeline (proxy/dataplane/pipeline.py) calls each once per route at load.
See docs/architecture.md.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from proxy.clock import SYSTEM_CLOCK, Clock
from proxy.cluster.upstream import UpstreamRuntime
from proxy.config.models import Policy, Route
from proxy.kernel.exchange import Handler
from proxy.kernel.handover import CheckpointProviders, Handover, Restore, Snapshot
from proxy.metrics import Metrics

T = TypeVar("T")


@dataclass(eq=False)
class LayerContext:
    """What a layer factory may use besides the route's own options."""

    metrics: Metrics
    upstream: UpstreamRuntime
    policy: Policy
    clock: Clock = SYSTEM_CLOCK
    # The runtime's hand-over (one per build); a bare context in a unit test gets its own.
    handover: Handover = field(default_factory=Handover)
    checkpoints: CheckpointProviders | None = None
    # Stateful objects by kind and name, for the admin API and the status page.
    exposed: dict[str, dict[str, Any]] = field(default_factory=dict)

    def keep(self, key: Hashable, settings: Any, build: Callable[[], T]) -> T:
        """The object for ``key``: the previous runtime's when ``settings`` are equal, else ``build()``.

        Called for every object that owns state, with a key naming it (e.g. ``("breaker",
        "upstream", "catalog")``) and the options it is built from (pydantic models compare by
        value). Within one build the same key gives the same object (routes share it).
        """
        return self.handover.keep(key, settings, build)

    def reusable(self, key: Hashable, settings: Any) -> Any | None:
        """What :meth:`keep` would hand back from the previous runtime for this key and settings, or None."""
        return self.handover.reusable(key, settings)

    def checkpoint(self, name: str, snapshot: Snapshot, restore: Restore) -> None:
        """Have ``snapshot()`` saved in each checkpoint and ``restore(data)`` called with it at start.

        See :mod:`proxy.ops.checkpoint` for the contract. Without a runtime this does nothing.
        """
        if self.checkpoints is not None:
            self.checkpoints.register(name, snapshot, restore)

    def expose(self, kind: str, name: str, obj: Any) -> None:
        """Make ``obj`` visible to the admin API as ``kind``/``name`` (e.g. bulkhead/checkout)."""
        self.exposed.setdefault(kind, {})[name] = obj

    def exposed_of(self, kind: str) -> dict[str, Any]:
        """The objects exposed so far under ``kind``, by name."""
        return self.exposed.get(kind, {})


class BuildLayer(Protocol):
    """A policy's layer factory: the handler around ``next_handler`` for ``route``, or None."""

    def __call__(self, route: Route, next_handler: Handler, ctx: LayerContext) -> Handler | None: ...
