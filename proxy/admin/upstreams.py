"""GET /admin/upstreams: each replica's health, ejection and load, per upstream.

POST /admin/upstreams/{upstream}/replicas/{replica}/drain|undrain: take a replica out of
rotation by operator decision (or put it back); see :meth:`ReplicaPicker.set_drained`.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from proxy.admin.host import AdminHost


def routes(fender: AdminHost) -> list[Route]:
    async def upstreams(request: Request) -> Response:
        runtime = fender.dataplane.runtime
        return JSONResponse(
            {
                "upstreams": {
                    name: {**upstream.picker.snapshot(), "dns": upstream.dns_snapshot()}
                    for name, upstream in runtime.upstreams.items()
                }
            }
        )

    return [Route("/admin/upstreams", upstreams), *drain_routes(fender)]


def drain_routes(fender: AdminHost) -> list[Route]:
    async def drain_replica(request: Request) -> Response:
        """Take a replica out of rotation (drain) or put it back (undrain); in-flight requests finish."""
        params = request.path_params
        action = params["action"]
        if action not in ("drain", "undrain"):
            return JSONResponse({"error": "action must be drain or undrain"}, status_code=404)
        upstream = fender.dataplane.runtime.upstreams.get(params["upstream"])
        if upstream is None:
            return JSONResponse({"error": f"no upstream named {params['upstream']!r}"}, status_code=404)
        picker = upstream.picker
        try:
            picker.set_drained(params["replica"], action == "drain")
        except KeyError:
            return JSONResponse({"error": f"no replica named {params['replica']!r}"}, status_code=404)
        return JSONResponse(picker.snapshot())

    return [
        # {replica:path}: a unix-socket replica's name (unix:/run/app.sock) has slashes, and the
        # server decodes %2F before routing.
        Route(
            "/admin/upstreams/{upstream}/replicas/{replica:path}/{action}",
            drain_replica,
            methods=["POST"],
        )
    ]
