"""Admin listener endpoints. Never on the request path; 127.0.0.1 unless the policy says otherwise."""

from __future__ import annotations

import asyncio
import time

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.openmetrics import exposition as openmetrics
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from proxy.admin import admission, breakers, cache, fault, ops, status, upstreams
from proxy.admin.host import AdminHost
from proxy.config import dump_policy
from proxy.config.redact import redact
from proxy.upstream.reachable import replica_reachable

# How long a readiness probe result is reused: probes from kubelet and from
# people must not turn into a connection storm against the upstreams.
READY_CACHE_SECONDS = 1.0
PROBE_TIMEOUT_CAP = 1.0


class Readiness:
    """Is the policy loaded and does every upstream have a replica that accepts connections?"""

    def __init__(self, fender: AdminHost) -> None:
        self._fender = fender
        self._checked_at = -1e9
        self._result: dict | None = None
        self._lock = asyncio.Lock()

    async def check(self) -> dict:
        if self._fender.draining:
            # Leaving the load balancer must not wait for the cache or the upstream probes.
            return {"ready": False, "draining": True, "upstreams": {}}
        async with self._lock:
            now = time.monotonic()
            if self._result is not None and now - self._checked_at < READY_CACHE_SECONDS:
                return self._result
            runtime = self._fender.dataplane.runtime
            names = list(runtime.upstreams)
            results = await asyncio.gather(*(self._upstream(runtime.upstreams[n]) for n in names))
            upstreams = dict(zip(names, results, strict=True))
            self._result = {"ready": all(u["reachable"] for u in upstreams.values()), "upstreams": upstreams}
            self._checked_at = time.monotonic()
            return self._result

    @staticmethod
    async def _upstream(upstream) -> dict:
        timeout = min(upstream.options.pool.connect_timeout, PROBE_TIMEOUT_CAP)
        replicas = upstream.replicas
        ok = await asyncio.gather(*(replica_reachable(r, timeout) for r in replicas))
        return {
            "reachable": any(ok),
            "replicas": {
                r.name: ("reachable" if up else "unreachable") for r, up in zip(replicas, ok, strict=True)
            },
        }


def build_admin_app(fender: AdminHost) -> Starlette:
    readiness = Readiness(fender)

    async def healthz(request: Request) -> Response:
        return PlainTextResponse("ok\n")

    async def readyz(request: Request) -> Response:
        result = await readiness.check()
        return JSONResponse(result, status_code=200 if result["ready"] else 503)

    async def metrics(request: Request) -> Response:
        for upstream in fender.dataplane.runtime.upstreams.values():
            upstream.export_pool_gauges()
        # Rendering many series takes milliseconds; a worker thread keeps the event loop serving.
        if "application/openmetrics-text" in request.headers.get("accept", ""):
            # OpenMetrics when the scraper asks for it: the exposition that carries exemplars (trace ids).
            body = await run_in_threadpool(openmetrics.generate_latest, fender.metrics.registry)
            return Response(body, media_type=openmetrics.CONTENT_TYPE_LATEST)
        body = await run_in_threadpool(generate_latest, fender.metrics.registry)
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    async def config(request: Request) -> Response:
        runtime = fender.dataplane.runtime
        # Secrets (URL passwords, values under keys like password or X-Api-Key) are shown as ***.
        policy = runtime.policy
        return JSONResponse(
            {"source": runtime.source, "policy": redact(dump_policy(policy), policy.env_secrets)}
        )

    async def routes(request: Request) -> Response:
        runtime = fender.dataplane.runtime
        out = []
        for route in runtime.routes:
            options = route.options
            out.append(
                {
                    "name": route.name,
                    "match": redact(
                        options.match.model_dump(mode="json", exclude_none=True, exclude_defaults=True),
                        runtime.policy.env_secrets,
                    ),
                    "upstream": options.upstream,
                    "replicas": [
                        {
                            "name": r.name,
                            "priority": r.priority,
                            "weight": r.weight,
                            "in_use": r.pool.in_use,
                            "idle": r.pool.idle,
                        }
                        for r in route.upstream.replicas
                    ],
                }
            )
        return JSONResponse({"routes": out})

    endpoints = [
        Route("/healthz", healthz),
        Route("/readyz", readyz),
        Route("/metrics", metrics),
        Route("/admin/config", config),
        Route("/admin/routes", routes),
    ]
    # Each policy module with admin endpoints keeps them in its own module
    # (proxy/admin/<module>.py, a function `routes(fender) -> list[Route]`) and adds one line here.

    # admin: rate limits and bulkheads
    endpoints += admission.routes(fender)

    # admin: breakers
    endpoints += breakers.routes(fender)

    # admin: upstreams and health
    endpoints += upstreams.routes(fender)

    # admin: cache
    endpoints += cache.routes(fender)

    # admin: fault injection
    endpoints += fault.routes(fender)

    # admin: operations
    endpoints += status.routes(fender)
    endpoints += ops.routes(fender)
    endpoints.append(ops.openapi_route(endpoints))

    return Starlette(routes=endpoints, middleware=[Middleware(ops.AdminTokenMiddleware, fender=fender)])
