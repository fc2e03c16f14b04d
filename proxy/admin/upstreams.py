"""GET /admin/upstreams: each replica's health, ejection and load, per upstream."""

from __future__ import annotations

from typing import TYPE_CHECKING

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

if TYPE_CHECKING:
    from proxy.server import Fender


def routes(fender: Fender) -> list[Route]:
    async def upstreams(request: Request) -> Response:
        runtime = fender.dataplane.runtime
        return JSONResponse(
            {"upstreams": {name: upstream.picker.snapshot() for name, upstream in runtime.upstreams.items()}}
        )

    return [Route("/admin/upstreams", upstreams)]
