"""Admin endpoints for fault injection: a drill switched on, changed or off without a policy edit.

``GET /admin/faults``: every route with a ``fault:`` section, its running settings and counts.
``POST /admin/routes/{name}/fault`` (answering that route's state after the change) with a JSON
object of ``fault:`` fields (``{"enabled": true}``, ``{"abort": {"status": 503, "percent": "20%"}}``)
replaces those fields of the running settings (each field whole; the others stay), validated as
the policy file's section is; ``{"reset": true}`` goes back to the policy file's settings. A route
needs a ``fault:`` section in the file (``enabled: false`` arms one without injecting), so a route
without it pays nothing on its data path. The running settings survive a reload that leaves the
route's section as it was; a reload that changes it starts from the file again.
"""

from __future__ import annotations

import json
import logging

from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from proxy.admin.host import AdminHost
from proxy.config.loader import format_path
from proxy.policies.fault.options import FaultOptions

log = logging.getLogger("fender")

MAX_BODY = 16 * 1024


def routes(fender: AdminHost) -> list[Route]:
    def injectors() -> dict:
        return fender.dataplane.runtime.exposed.get("fault", {})

    def missing(name: str) -> Response:
        known = any(route.name == name for route in fender.dataplane.runtime.routes)
        error = (
            f"route {name!r} has no fault: section (add one to the policy; enabled: false arms it without injecting)"
            if known
            else f"no route named {name!r}"
        )
        return JSONResponse({"error": error}, status_code=404)

    async def list_faults(request: Request) -> Response:
        """Every route with a fault: section: running settings, faults injected, tries being delayed."""
        return JSONResponse({"routes": {name: inj.snapshot() for name, inj in injectors().items()}})

    async def route_fault(request: Request) -> Response:
        """Switch a route's fault injection on or off, change its settings, or reset them to the file's."""
        name = request.path_params["name"]
        injector = injectors().get(name)
        if injector is None:
            return missing(name)
        raw = await request.body()
        if len(raw) > MAX_BODY:
            return JSONResponse({"error": f"body larger than {MAX_BODY} bytes"}, status_code=413)
        try:
            body = json.loads(raw or b"{}")
        except ValueError:
            return JSONResponse({"error": "body must be JSON"}, status_code=400)
        if not isinstance(body, dict) or not body:
            return JSONResponse(
                {"error": 'give a JSON object of fault fields, e.g. {"enabled": true}, or {"reset": true}'},
                status_code=400,
            )
        if "reset" in body:
            if body != {"reset": True}:
                return JSONResponse({"error": '"reset" takes true and no other field'}, status_code=400)
            injector.reset()
            log.warning(
                "fault injection on route %s reset to the policy file's settings by the admin API", name
            )
            return JSONResponse(injector.snapshot())
        merged = injector.options.model_dump(mode="json")
        merged.update(body)
        try:
            options = FaultOptions.model_validate(merged)
        except ValidationError as error:
            problems = [{"at": format_path(e["loc"]) or "fault", "message": e["msg"]} for e in error.errors()]
            text = "; ".join(f"{p['at']}: {p['message']}" for p in problems)
            return JSONResponse(
                {"error": f"invalid fault settings: {text}", "problems": problems}, status_code=400
            )
        injector.change(options, "admin API")
        log.warning(
            "fault injection on route %s changed by the admin API: %s",
            name,
            json.dumps(options.model_dump(mode="json", exclude_none=True), sort_keys=True),
        )
        return JSONResponse(injector.snapshot())

    return [
        Route("/admin/faults", list_faults, methods=["GET"]),
        Route("/admin/routes/{name}/fault", route_fault, methods=["POST"]),
    ]
