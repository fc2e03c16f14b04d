"""Admin endpoints of the response cache: state and purge."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from proxy.resilience.cache.layer import STORE_KEY
from proxy.resilience.cache.policy import normalise_query
from proxy.state.redis import STATE_KEY as FLEET_KEY

if TYPE_CHECKING:
    from proxy.server import Fender

_HIT_RESULTS = ("hit", "stale", "revalidated", "coalesced")


def _split(text: str) -> tuple[bytes | None, bytes]:
    """'http://host/p?q' -> (b'host', b'/p?q'); '/p?q' -> (None, b'/p?q')."""
    parts = urlsplit(text)
    if parts.scheme or parts.netloc:
        target = (parts.path or "/") + ("?" + parts.query if parts.query else "")
        return parts.netloc.lower().encode("latin-1"), target.encode("latin-1")
    return None, text.encode("latin-1")


def _target_of(key: bytes) -> tuple[bytes, bytes]:
    slash = key.find(b"/")
    return (key, b"") if slash < 0 else (key[:slash], key[slash:])


def routes(fender: Fender) -> list[Route]:
    def store():
        return fender.dataplane.runtime.shared.get(STORE_KEY)

    async def state(request: Request) -> Response:
        s = store()
        by_route: dict[str, dict[str, float]] = {}
        for metric in fender.metrics.cache_requests.collect():
            for sample in metric.samples:
                if sample.name.endswith("_total"):
                    route = by_route.setdefault(sample.labels["route"], {})
                    route[sample.labels["result"]] = sample.value
        out_routes = {}
        for name, results in by_route.items():
            lookups = sum(v for k, v in results.items() if k != "bypass")
            hits = sum(results.get(k, 0) for k in _HIT_RESULTS)
            out_routes[name] = {
                "results": results,
                "hit_ratio": round(hits / lookups, 4) if lookups else None,
            }
        policy = fender.dataplane.runtime.policy
        return JSONResponse(
            {
                "enabled": s is not None,
                "urls": len(s) if s is not None else 0,
                "entries": s.entries if s is not None else 0,
                "bytes": s.bytes if s is not None else 0,
                "max_size": policy.cache.max_size,
                "max_object_size": policy.cache.max_object_size,
                "routes": out_routes,
                # Fleet mode: the Redis tier's state (null with state.backend: memory).
                "fleet": fleet.snapshot()
                if (fleet := fender.dataplane.runtime.shared.get(FLEET_KEY))
                else None,
            }
        )

    async def purge(request: Request) -> Response:
        try:
            body = json.loads(await request.body() or b"{}")
        except ValueError:
            return JSONResponse({"error": "body must be JSON"}, status_code=400)
        if not isinstance(body, dict) or not (
            isinstance(body.get("url"), str) ^ isinstance(body.get("prefix"), str)
        ):
            return JSONResponse(
                {"error": 'give exactly one of {"url": "http://host/path?query"} or {"prefix": "/path/"}'},
                status_code=400,
            )
        s = store()
        if s is None:
            return JSONResponse({"purged": 0})
        purged = 0
        # Fleet mode: purged keys are also deleted from Redis and published to every sidecar.
        fleet = fender.dataplane.runtime.shared.get(FLEET_KEY)
        dropped: set[bytes] = set()
        if "url" in body:
            host, target = _split(body["url"])
            wanted = {normalise_query(target, mode) for mode in ("as-is", "sorted", "ignore")}
            if host is not None:
                dropped.update(host + t for t in wanted)  # in Redis even when this sidecar has none
            for key in s.keys():
                key_host, key_target = _target_of(key)
                if key_target in wanted and (host is None or key_host == host) and s.delete(key):
                    dropped.add(key)
                    purged += 1
        else:
            host, prefix = _split(body["prefix"])
            for key in s.keys():
                key_host, key_target = _target_of(key)
                if key_target.startswith(prefix) and (host is None or key_host == host) and s.delete(key):
                    dropped.add(key)
                    purged += 1
        if fleet is not None:
            return JSONResponse({"purged": purged, "fleet": await fleet.invalidate(sorted(dropped))})
        return JSONResponse({"purged": purged})

    return [
        Route("/admin/cache", state, methods=["GET"]),
        Route("/admin/cache/purge", purge, methods=["POST"]),
    ]
