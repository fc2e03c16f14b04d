"""Admin endpoints for admission control: live rate-limit tables and bulkheads, per route."""

from __future__ import annotations

from typing import TYPE_CHECKING

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

if TYPE_CHECKING:
    from proxy.server import Fender


def routes(fender: Fender) -> list[Route]:
    async def ratelimits(request: Request) -> Response:
        shared = fender.dataplane.runtime.shared.get("ratelimit", {})
        return JSONResponse({"routes": {name: state.snapshot() for name, state in shared.items()}})

    async def bulkheads(request: Request) -> Response:
        shared = fender.dataplane.runtime.shared.get("bulkhead", {})
        return JSONResponse({"routes": {name: state.snapshot() for name, state in shared.items()}})

    return [Route("/admin/ratelimits", ratelimits), Route("/admin/bulkheads", bulkheads)]
