"""Admin endpoints for admission control: live rate-limit tables and bulkheads, per route."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from proxy.admin.host import AdminHost


def routes(fender: AdminHost) -> list[Route]:
    async def ratelimits(request: Request) -> Response:
        shared = fender.dataplane.runtime.exposed.get("ratelimit", {})
        return JSONResponse({"routes": {name: state.snapshot() for name, state in shared.items()}})

    async def bulkheads(request: Request) -> Response:
        shared = fender.dataplane.runtime.exposed.get("bulkhead", {})
        return JSONResponse({"routes": {name: state.snapshot() for name, state in shared.items()}})

    return [Route("/admin/ratelimits", ratelimits), Route("/admin/bulkheads", bulkheads)]
