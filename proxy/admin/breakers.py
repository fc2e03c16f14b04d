"""Admin endpoints for circuit breakers.

``GET /admin/breakers``: every breaker with its state, time left open, window
counts and half-open permits. ``POST /admin/breakers/{name}/open|close|reset``:
force a breaker open (for its current open_for) or closed (which also
resets its window and open_for), or reset it (closed, and its trip count
zeroed); an operator's lever during an incident.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from proxy.admin.host import AdminHost
from proxy.policies.breaker.layer import breakers


def routes(fender: AdminHost) -> list[Route]:
    async def list_breakers(request: Request) -> Response:
        """Every circuit breaker: state, time left open, window counts."""
        runtime = fender.dataplane.runtime
        return JSONResponse({"breakers": [b.snapshot() for b in breakers(runtime.exposed)]})

    async def force(request: Request) -> Response:
        """Force a breaker open or closed, or reset it (action: open, close, reset)."""
        name = request.path_params["name"]
        action = request.path_params["action"]
        if action not in ("open", "close", "reset"):
            return JSONResponse({"error": "action must be open, close or reset"}, status_code=404)
        for breaker in breakers(fender.dataplane.runtime.exposed):
            if breaker.name == name:
                if action == "reset":
                    breaker.reset(by="admin API")
                else:
                    breaker.force("open" if action == "open" else "closed", by="admin API")
                return JSONResponse(breaker.snapshot())
        return JSONResponse({"error": f"no breaker named {name!r}"}, status_code=404)

    return [
        Route("/admin/breakers", list_breakers, methods=["GET"]),
        Route("/admin/breakers/{name}/{action}", force, methods=["POST"]),
    ]
