"""The live status page on the admin listener.

``GET /`` serves one HTML page (with ``/status.css`` and ``/status.js``, files
shipped inside the package: no build step, no CDN, works offline). The page
polls ``GET /admin/status`` every 2 s: one JSON document gathered from the
running objects (routes and their recent traffic, upstream replicas, breakers,
cache, policy status). Its buttons call the ordinary admin endpoints
(breaker force, replica drain, cache purge, rollback) with the admin token the
operator typed once (kept in the tab's sessionStorage).

The page and its assets are not under /admin/, so they need no token; every
piece of data and every action is under /admin/ and does.
"""

from __future__ import annotations

from datetime import UTC, datetime
from importlib.resources import files
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from proxy import __version__
from proxy.admin.host import AdminHost
from proxy.config.redact import redact
from proxy.policies.breaker.layer import breakers

POLL_SECONDS = 2.0

# Everything the page loads comes from this listener; no inline script, no third party.
_HEADERS = {
    "cache-control": "no-cache",
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "no-referrer",
    "content-security-policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
        "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
    ),
}

_ASSETS = {
    "/": ("status.html", "text/html; charset=utf-8"),
    "/status.css": ("status.css", "text/css; charset=utf-8"),
    "/status.js": ("status.js", "text/javascript; charset=utf-8"),
}

_CACHE_HITS = ("hit", "stale", "revalidated", "coalesced")


def _asset(name: str) -> bytes:
    return files("proxy.admin").joinpath("static", name).read_bytes()


def _breaker(snapshot: dict) -> dict:
    window = snapshot["window"]
    calls = window["calls"]
    return {
        "name": snapshot["name"],
        "state": snapshot["state"],
        "open_seconds_left": snapshot["retry_after_seconds"] if snapshot["state"] == "open" else 0,
        "failure_rate": round(window["failures"] / calls, 4) if calls else None,
        "slow_call_rate": round(window["slow"] / calls, 4) if calls else None,
        "window": window,
        "trips": snapshot["trips"],
    }


def _fault(snapshot: dict) -> dict:
    """A route's fault injection as the page shows it: on or off, what it injects, how much so far."""
    parts = []
    if snapshot["delay"] is not None:
        parts.append(f"delay {snapshot['delay']['fixed']} on {snapshot['delay']['percent']}")
    if snapshot["abort"] is not None:
        parts.append(f"abort {snapshot['abort']['status']} on {snapshot['abort']['percent']}")
    return {
        "enabled": snapshot["enabled"],
        "summary": ", ".join(parts),
        "scoped": bool(snapshot["only_if_header"]),
        "active": snapshot["active"],
        "injected": snapshot["injected"]["delay"] + snapshot["injected"]["abort"],
        "changed_by_admin": snapshot["changed_by_admin"],
    }


def _cache(fender: AdminHost) -> dict:
    runtime = fender.dataplane.runtime
    store = runtime.exposed.get("cache", {}).get("store")
    lookups = hits = 0.0
    for family in fender.metrics.cache_requests.collect():
        for s in family.samples:
            if s.name.endswith("_total") and s.labels["result"] != "bypass":
                lookups += s.value
                if s.labels["result"] in _CACHE_HITS:
                    hits += s.value
    stale = sum(
        s.value
        for family in fender.metrics.cache_stale_served.collect()
        for s in family.samples
        if s.name.endswith("_total")
    )
    return {
        "enabled": store is not None,
        "hit_ratio": round(hits / lookups, 4) if lookups else None,
        "lookups": int(lookups),
        "bytes": store.bytes if store is not None else 0,
        "max_size": runtime.policy.cache.max_size,
        "entries": store.entries if store is not None else 0,
        "stale_served": int(stale),
    }


def gather(fender: AdminHost) -> dict:
    """The document behind the status page (``GET /admin/status``)."""
    runtime = fender.dataplane.runtime
    traffic = fender.history.routes([r.name for r in runtime.routes])
    tunnels: dict[str, int] = {}
    for tunnel in fender.dataplane.tunnels.open:
        tunnels[tunnel.route_name] = tunnels.get(tunnel.route_name, 0) + 1
    faults = runtime.exposed.get("fault", {})
    routes = []
    hedgers = runtime.exposed.get("hedge", {})
    limiters = runtime.exposed.get("adaptive", {})
    for route in runtime.routes:
        entry: dict[str, Any] = {"name": route.name, "upstream": route.options.upstream}
        entry.update(traffic[route.name])
        entry["open_tunnels"] = tunnels.get(route.name, 0)
        hedger = hedgers.get(route.name)
        entry["hedge"] = hedger.snapshot() if hedger is not None else None
        limiter = limiters.get(route.name)
        entry["adaptive_concurrency"] = limiter.snapshot() if limiter is not None else None
        fault = faults.get(route.name)
        entry["fault"] = _fault(fault.snapshot()) if fault is not None else None
        routes.append(entry)
    upstreams = []
    budgets = runtime.exposed.get("retry_budget", {})  # budgets shared by an upstream's routes
    for name, upstream in runtime.upstreams.items():
        snapshot = upstream.picker.snapshot()
        snapshot["name"] = name
        budget = budgets.get(name)
        snapshot["retry_budget"] = budget.snapshot() if budget is not None else None
        snapshot["dns"] = upstream.dns_snapshot()  # where replicas from DNS come from, how fresh
        upstreams.append(snapshot)
    return redact(
        {
            "fender_version": __version__,
            "generated_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "poll_seconds": POLL_SECONDS,
            "draining": fender.draining,
            "history_interval_seconds": fender.history.interval,
            "policy": fender.reloader.status(),
            "routes": routes,
            "upstreams": upstreams,
            "breakers": [_breaker(b.snapshot()) for b in breakers(runtime.exposed)],
            "cache": _cache(fender),
        },
        runtime.policy.env_secrets,
    )  # nothing on the page shows a secret (a URL password in an error message, say)


def routes(fender: AdminHost) -> list[Route]:
    bodies = {path: (_asset(name), media) for path, (name, media) in _ASSETS.items()}

    def asset(path: str):
        body, media = bodies[path]

        async def serve(request: Request) -> Response:
            return Response(body, media_type=media, headers=_HEADERS)

        serve.__doc__ = "The status page." if path == "/" else f"Status page asset {path}."
        # What the OpenAPI document says this path answers (a function attribute, set through its
        # __dict__: mypy does not model attributes added to a function).
        serve.__dict__["media_type"] = media
        return serve

    async def status(request: Request) -> Response:
        """Everything the status page shows: routes, replicas, breakers, cache, policy."""
        return JSONResponse(gather(fender), headers={"cache-control": "no-store"})

    return [
        *(Route(path, asset(path), methods=["GET"]) for path in _ASSETS),
        Route("/admin/status", status, methods=["GET"]),
    ]
