"""Admin endpoints for operations (reload, rollback, config status, checkpoint), the bearer-token
middleware, and the OpenAPI document of the whole admin API.

GET endpoints never change anything; every change is a POST.
"""

from __future__ import annotations

import inspect
import re
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from proxy import __version__
from proxy.admin.host import AdminHost
from proxy.ops.auth import WRONG_TOKEN, token_problem

ADMIN_PREFIX = "/admin/"

_ATTEMPT = {
    "type": "object",
    "required": ["result"],
    "properties": {
        "result": {"type": "string", "enum": ["applied", "unchanged", "failed"]},
        "error": {"type": ["string", "null"], "description": "FILE:LINE:COL: message of the first problem"},
        "errors": {"type": "array", "items": {"type": "string"}},
        "status": {"$ref": "#/components/schemas/ConfigStatus"},
    },
}

_CONFIG_STATUS = {
    "type": "object",
    "required": ["ok", "error", "version", "loaded_at", "source", "matches_file", "rollback_available"],
    "properties": {
        "ok": {"type": "boolean", "description": "false when the last reload attempt failed"},
        "error": {"type": ["string", "null"], "description": "FILE:LINE:COL: message of the last failure"},
        "errors": {"type": "array", "items": {"type": "string"}},
        "version": {"type": "integer", "description": "policy format version of the running policy"},
        "fingerprint": {"type": "string", "description": "sha256 of the effective running policy"},
        "loaded_at": {"type": "string", "format": "date-time"},
        "source": {"type": ["string", "null"], "description": "policy file path"},
        "applied_by": {
            "type": "string",
            "enum": ["start", "file", "signal", "api", "rollback", "auto_rollback"],
        },
        "matches_file": {
            "type": "boolean",
            "description": "false when the running policy differs from the file",
        },
        "rollback_available": {"type": "integer", "description": "previous good policies kept"},
        "pending_restart": {"type": "array", "items": {"type": "string"}},
        "warnings": {
            "type": "array",
            "items": {"type": "string"},
            "description": "FILE:LINE:COL: warning: ... lines about the running policy (routes that can never "
            "match, limits another limit makes unreachable)",
        },
        "last_attempt": {"type": ["object", "null"]},
        "last_failure": {"type": ["object", "null"]},
    },
}

_ERROR = {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}}


def _json(description: str, schema: dict | None = None) -> dict:
    return {
        "description": description,
        "content": {"application/json": {"schema": schema or {"type": "object"}}},
    }


def _text(description: str) -> dict:
    return {"description": description, "content": {"text/plain": {"schema": {"type": "string"}}}}


def _ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


def _object(required: list[str], **properties: dict) -> dict:
    return {"type": "object", "required": required, "properties": properties}


def _array(name: str) -> dict:
    return {"type": "array", "items": _ref(name)}


def _map(schema: dict) -> dict:
    return {"type": "object", "additionalProperties": schema}


def _path_param(name: str, description: str, enum: list[str] | None = None) -> dict:
    schema: dict = {"type": "string"}
    if enum:
        schema["enum"] = enum
    return {"name": name, "in": "path", "required": True, "description": description, "schema": schema}


_NUMBER = {"type": "number"}
_INT = {"type": "integer"}

# Shapes of the module endpoints' answers (the fields every consumer may rely on).
_MODULE_SCHEMAS = {
    "Breaker": _object(
        ["name", "state", "retry_after_seconds", "open_for_seconds", "trips", "window"],
        name={"type": "string"},
        state={"type": "string", "enum": ["closed", "open", "half_open"]},
        retry_after_seconds=_NUMBER,
        open_for_seconds=_NUMBER,
        trips=_INT,
        consecutive_failures=_INT,
        window={"type": "object"},
        half_open={"type": ["object", "null"]},
    ),
    "Upstream": _object(
        ["balance", "active_priority", "panic", "replicas"],
        balance={"type": "string"},
        active_priority={"type": ["integer", "null"]},
        panic={"type": "boolean"},
        health_checks={"type": "boolean"},
        outlier_detection={"type": "boolean"},
        replicas={
            "type": "array",
            "items": _object(
                ["name", "state", "serving"],
                name={"type": "string"},
                state={"type": "string", "enum": ["healthy", "unhealthy", "ejected", "overloaded"]},
                serving={"type": "boolean"},
            ),
        },
    ),
    "RouteRateLimits": _object(
        ["limits"],
        limits={
            "type": "array",
            "items": _object(["name", "key", "rate", "burst", "shadow", "keys", "max_keys"]),
        },
    ),
    "Bulkhead": _object(
        ["max_concurrent", "in_flight", "max_queued", "queued", "queue_timeout_seconds"],
        max_concurrent=_INT,
        in_flight=_INT,
        max_queued=_INT,
        queued=_INT,
        queue_timeout_seconds=_NUMBER,
    ),
    "Fault": _object(
        ["route", "enabled", "delay", "abort", "only_if_header", "max_active", "active", "injected"],
        route={"type": "string"},
        enabled={"type": "boolean"},
        delay={"type": ["object", "null"]},
        abort={"type": ["object", "null"]},
        only_if_header={"type": "array", "items": {"type": "string"}},
        max_active={"type": ["integer", "null"]},
        active=_INT,
        injected=_object(["delay", "abort"], delay=_INT, abort=_INT),
        skipped_max_active=_INT,
        changed_by_admin={"type": "boolean"},
        as_in_file={"type": "boolean"},
    ),
}


# Documentation of the endpoints Fender's core serves. Endpoints of policy
# modules are documented from their endpoint docstring unless listed here.
DOCS: dict[str, dict[str, dict[str, Any]]] = {
    "/healthz": {"get": {"summary": "Liveness: the process serves.", "responses": {"200": _text("ok")}}},
    "/readyz": {
        "get": {
            "summary": "Readiness: policy loaded, every upstream has a reachable replica, not draining.",
            "responses": {"200": _json("ready"), "503": _json("not ready, or draining after SIGTERM")},
        }
    },
    "/metrics": {"get": {"summary": "Prometheus metrics.", "responses": {"200": _text("exposition format")}}},
    "/admin/config": {
        "get": {
            "summary": "The effective running policy, defaults filled in.",
            "responses": {"200": _json("policy")},
        }
    },
    "/admin/routes": {
        "get": {
            "summary": "Routes in match order with replicas and pool use.",
            "responses": {"200": _json("routes")},
        }
    },
    "/admin/config/status": {
        "get": {
            "summary": "Running policy: version, when and how it was applied, whether the last reload failed.",
            "responses": {"200": _json("status", {"$ref": "#/components/schemas/ConfigStatus"})},
        }
    },
    "/admin/reload": {
        "post": {
            "summary": "Read, validate and apply the policy file; a bad file leaves the running policy.",
            "responses": {
                "200": _json("applied or unchanged", {"$ref": "#/components/schemas/ReloadAttempt"}),
                "422": _json(
                    "invalid policy; nothing changed", {"$ref": "#/components/schemas/ReloadAttempt"}
                ),
            },
        }
    },
    "/admin/rollback": {
        "post": {
            "summary": "Return to the previous good policy (the file is left alone).",
            "responses": {
                "200": _json("rolled back", {"$ref": "#/components/schemas/ReloadAttempt"}),
                "409": _json("no previous policy", {"$ref": "#/components/schemas/Error"}),
            },
        }
    },
    "/admin/checkpoint": {
        "post": {
            "summary": "Write a checkpoint now.",
            "responses": {
                "200": _json("written", {"type": "object", "required": ["path", "providers"]}),
                "409": _json("checkpoints are off", {"$ref": "#/components/schemas/Error"}),
                "500": _json("write failed", {"$ref": "#/components/schemas/Error"}),
            },
        }
    },
    "/admin/openapi.json": {"get": {"summary": "This document.", "responses": {"200": _json("OpenAPI 3.1")}}},
    # Endpoints of the policy modules (proxy/admin/<module>.py).
    "/admin/breakers": {
        "get": {
            "summary": "Every circuit breaker: state, time left open, window counts, half-open permits.",
            "responses": {"200": _json("breakers", _object(["breakers"], breakers=_array("Breaker")))},
        }
    },
    "/admin/breakers/{name}/{action}": {
        "post": {
            "summary": "Force a breaker open (for its open_for) or closed, or reset it (closed, trips zeroed).",
            "parameters": [
                _path_param("name", "breaker name (the upstream's, or the route's with scope: route)"),
                _path_param("action", "what to do", ["open", "close", "reset"]),
            ],
            "responses": {
                "200": _json("the breaker after the change", _ref("Breaker")),
                "404": _json("no such breaker or action", _ref("Error")),
            },
        }
    },
    "/admin/upstreams": {
        "get": {
            "summary": "Each upstream's replicas: health, ejection, pass-over, load; serving priority, panic.",
            "responses": {
                "200": _json("upstreams", _object(["upstreams"], upstreams=_map(_ref("Upstream"))))
            },
        }
    },
    "/admin/ratelimits": {
        "get": {
            "summary": "Rate limits per route with the number of keys (buckets) held.",
            "responses": {
                "200": _json("rate limits", _object(["routes"], routes=_map(_ref("RouteRateLimits"))))
            },
        }
    },
    "/admin/bulkheads": {
        "get": {
            "summary": "Bulkheads per route: requests in flight and queued against their limits.",
            "responses": {"200": _json("bulkheads", _object(["routes"], routes=_map(_ref("Bulkhead"))))},
        }
    },
    "/admin/cache": {
        "get": {
            "summary": "The response cache: size, bounds, and per-route results and hit ratio.",
            "responses": {
                "200": _json(
                    "cache",
                    _object(
                        ["enabled", "urls", "entries", "bytes", "max_size", "max_object_size", "routes"],
                        enabled={"type": "boolean"},
                        urls={"type": "integer"},
                        entries={"type": "integer"},
                        bytes={"type": "integer"},
                        max_size={"type": "integer"},
                        max_object_size={"type": "integer"},
                        routes={"type": "object"},
                    ),
                )
            },
        }
    },
    "/admin/status": {
        "get": {
            "summary": "Everything the status page shows: routes with last-minute traffic, replicas, breakers, "
            "cache and policy status (the page at / polls it).",
            "responses": {
                "200": _json(
                    "status",
                    _object(
                        ["policy", "routes", "upstreams", "breakers", "cache"],
                        policy={"type": "object"},
                        routes={"type": "array"},
                        upstreams={"type": "array"},
                        breakers={"type": "array"},
                        cache={"type": ["object", "null"]},
                    ),
                )
            },
        }
    },
    "/admin/upstreams/{upstream}/replicas/{replica}/{action}": {
        "post": {
            "summary": "Drain a replica (no new requests; in-flight ones finish) or put it back (undrain).",
            "parameters": [
                _path_param("upstream", "upstream name"),
                _path_param("replica", "replica host:port"),
                _path_param("action", "what to do", ["drain", "undrain"]),
            ],
            "responses": {
                "200": _json("the upstream after the change", {"type": "object"}),
                "404": _json("no such upstream, replica or action", _ref("Error")),
            },
        }
    },
    "/admin/faults": {
        "get": {
            "summary": "Fault injection per route (routes with a fault: section): running settings and counts.",
            "responses": {"200": _json("faults", _object(["routes"], routes=_map(_ref("Fault"))))},
        }
    },
    "/admin/routes/{name}/fault": {
        "post": {
            "summary": "Switch a drill on or off, change its settings (fields of fault:, each whole), or reset "
            'them to the policy file\'s with {"reset": true}.',
            "parameters": [_path_param("name", "route name")],
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {
                        "schema": {
                            "oneOf": [
                                {
                                    "type": "object",
                                    "examples": [
                                        {"enabled": True},
                                        {"abort": {"status": 503, "percent": "20%"}},
                                    ],
                                },
                                _object(["reset"], reset={"const": True}),
                            ]
                        }
                    }
                },
            },
            "responses": {
                "200": _json("the route's fault injection after the change", _ref("Fault")),
                "400": _json(
                    "not JSON, or settings a fault: section would refuse (with their path)", _ref("Error")
                ),
                "404": _json("no such route, or it has no fault: section", _ref("Error")),
                "413": _json("body over 16KiB", _ref("Error")),
            },
        },
    },
    "/admin/cache/purge": {
        "post": {
            "summary": "Remove stored responses of one URL (all its variants) or of every URL under a path prefix.",
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {
                        "schema": {
                            "oneOf": [
                                _object(
                                    ["url"], url={"type": "string", "examples": ["http://host/path?q=1"]}
                                ),
                                _object(["prefix"], prefix={"type": "string", "examples": ["/catalog/"]}),
                            ]
                        }
                    }
                },
            },
            "responses": {
                "200": _json("purged", _object(["purged"], purged={"type": "integer"})),
                "400": _json("neither or both of url and prefix", _ref("Error")),
            },
        }
    },
}


class AdminTokenMiddleware:
    """Requires ``Authorization: Bearer <token>`` on /admin/* when a token is configured.

    /healthz, /readyz and /metrics stay open for probes and scrapers.
    """

    def __init__(self, app, fender: AdminHost) -> None:
        self.app = app
        self.fender = fender

    async def __call__(self, scope, receive, send) -> None:
        token = self.fender.admin_token
        if token is not None and scope["type"] == "http" and scope["path"].startswith(ADMIN_PREFIX):
            header = None
            for name, value in scope["headers"]:
                if name == b"authorization":
                    header = value.decode("latin-1")
                    break
            problem = token_problem(header, token)
            if problem is not None:
                # RFC 6750: a token was sent and refused -> error="invalid_token"; none sent -> no error code.
                challenge = 'Bearer realm="fender-admin"'
                if problem is WRONG_TOKEN:
                    challenge += ', error="invalid_token"'
                response = JSONResponse(
                    {"error": problem}, status_code=401, headers={"www-authenticate": challenge}
                )
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _attempt_body(fender: AdminHost, attempt) -> dict:
    return {
        "result": attempt.result,
        "error": attempt.error,
        "errors": attempt.errors,
        "status": fender.reloader.status(),
    }


def routes(fender: AdminHost) -> list[Route]:
    async def config_status(request: Request) -> Response:
        return JSONResponse(fender.reloader.status())

    async def reload(request: Request) -> Response:
        attempt = await fender.reloader.reload("api")
        return JSONResponse(
            _attempt_body(fender, attempt), status_code=422 if attempt.result == "failed" else 200
        )

    async def rollback(request: Request) -> Response:
        attempt = await fender.reloader.rollback("manual")
        if attempt is None:
            return JSONResponse({"error": "no previous policy to roll back to"}, status_code=409)
        return JSONResponse(
            _attempt_body(fender, attempt), status_code=200 if attempt.result == "applied" else 500
        )

    async def checkpoint(request: Request) -> Response:
        checkpointer = fender.checkpointer
        if checkpointer is None:
            return JSONResponse({"error": "checkpoints are off (no checkpoint: section)"}, status_code=409)
        if not await checkpointer.write():
            return JSONResponse({"error": checkpointer.last_error or "write failed"}, status_code=500)
        return JSONResponse({"path": checkpointer.path, "providers": fender.runtime.checkpoints.names()})

    return [
        Route("/admin/config/status", config_status, methods=["GET"]),
        Route("/admin/reload", reload, methods=["POST"]),
        Route("/admin/rollback", rollback, methods=["POST"]),
        Route("/admin/checkpoint", checkpoint, methods=["POST"]),
    ]


def openapi_path(path: str) -> str:
    """A Starlette route path as OpenAPI writes it: ``{replica:path}`` -> ``{replica}``."""
    return re.sub(r"\{(\w+):\w+\}", r"{\1}", path)


def build_openapi(endpoints: list[Route]) -> dict:
    """OpenAPI 3.1 for the served routes: DOCS where written, the endpoint docstring otherwise."""
    paths: dict[str, dict] = {}
    for route in endpoints:
        methods = sorted(m.lower() for m in (route.methods or {"GET"}) if m != "HEAD")
        path = openapi_path(route.path)
        documented = DOCS.get(path, {})
        entry = paths.setdefault(path, {})
        for method in methods:
            if method in documented:
                entry[method] = dict(documented[method])
                continue
            doc = inspect.getdoc(route.endpoint) or route.name.replace("_", " ")
            media = getattr(route.endpoint, "media_type", None)
            if media is not None:
                # A page or asset (the status page is text/html), not a JSON endpoint.
                content = {media.partition(";")[0]: {"schema": {"type": "string"}}}
                entry[method] = {
                    "summary": doc.splitlines()[0],
                    "responses": {"200": {"description": doc, "content": content}},
                }
                continue
            responses = {"200": _json("OK"), "400": _json("bad request", _ERROR)}
            if "{" in path:
                responses["404"] = _json("no such name", _ERROR)
            # Documented from the endpoint's docstring only: its module can add a DOCS entry.
            entry[method] = {"summary": doc.splitlines()[0], "responses": responses, "x-fender-generic": True}
    document = {
        "openapi": "3.1.0",
        "info": {"title": "Fender admin API", "version": __version__},
        "paths": paths,
        "components": {
            "schemas": {
                "ConfigStatus": _CONFIG_STATUS,
                "ReloadAttempt": _ATTEMPT,
                "Error": _ERROR,
                **_MODULE_SCHEMAS,
            },
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }
    for path, entry in paths.items():
        if path.startswith(ADMIN_PREFIX):
            for op in entry.values():
                op.setdefault("security", [{"bearer": []}])
    return document


def openapi_route(endpoints: list[Route]) -> Route:
    cache: dict[str, Any] = {}
    all_routes = endpoints  # the list the app serves; this route is appended to it too

    async def openapi(request: Request) -> Response:
        if "doc" not in cache:
            cache["doc"] = build_openapi(all_routes)
        return JSONResponse(cache["doc"])

    return Route("/admin/openapi.json", openapi, methods=["GET"])
