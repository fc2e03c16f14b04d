"""Per-route pipelines, assembled once when the policy loads.

A pipeline is a chain of layers, tower-style: each layer is built around the
next one and exposes ``async __call__(exchange) -> Reply``. The order is fixed
(see architecture.md): rate limit, cache, circuit breaker, bulkhead, retry,
then the forwarder. Each policy module contributes one factory to
``LAYER_FACTORIES``; a factory returns None when its section is absent from the
route, so a route pays only for the policies it names.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from proxy.dataplane.exchange import Exchange, Reply
from proxy.dataplane.forward import Forwarder, UpstreamRuntime
from proxy.metrics import Metrics

Handler = Callable[[Exchange], Awaitable[Reply]]
# (route options, the next handler, metrics) -> a handler wrapping next, or None
LayerFactory = Callable[[object, Handler, Metrics], Handler | None]

# Outermost first. Policy issues add their factory here.
LAYER_FACTORIES: list[LayerFactory] = []


def build_pipeline(route, upstream: UpstreamRuntime, metrics: Metrics) -> Handler:
    handler: Handler = Forwarder(upstream, route)
    for factory in reversed(LAYER_FACTORIES):
        wrapped = factory(route, handler, metrics)
        if wrapped is not None:
            handler = wrapped
    return handler
