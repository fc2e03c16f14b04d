"""Admin endpoints of the response cache: state and purge (by URL, prefix or tag)."""

from __future__ import annotations

import json
from urllib.parse import urlsplit

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from proxy.admin.host import AdminHost
from proxy.policies.cache.purge import MAX_TAG_LENGTH, drop_prefix, drop_tags, tags_of
from proxy.policies.cache.rfc9111 import normalise_query
from proxy.state.keys import target_of

_HIT_RESULTS = ("hit", "stale", "revalidated", "coalesced")
# Tags one purge request may name.
MAX_PURGE_TAGS = 100


def _split(text: str) -> tuple[bytes | None, bytes]:
    """'http://host/p?q' -> (b'host', b'/p?q'); '/p?q' -> (None, b'/p?q')."""
    parts = urlsplit(text)
    if parts.scheme or parts.netloc:
        target = (parts.path or "/") + ("?" + parts.query if parts.query else "")
        return parts.netloc.lower().encode("latin-1"), target.encode("latin-1")
    return None, text.encode("latin-1")


def _purge_kind(body) -> str | None:
    """Which purge ``body`` asks for (url, prefix or tag), None when it is not exactly one valid one."""
    if not isinstance(body, dict):
        return None
    given = [k for k in ("url", "prefix", "tags") if k in body]
    if len(given) != 1:
        return None
    value = body[given[0]]
    if given[0] != "tags":
        return given[0] if isinstance(value, str) and _latin1(value) else None
    if not isinstance(value, list) or not 0 < len(value) <= MAX_PURGE_TAGS:
        return None
    for tag in value:
        if (
            not isinstance(tag, str)
            or not tag
            or not _latin1(tag)
            or tags_of([tag.encode("latin-1")]) != (tag.encode("latin-1"),)
        ):
            return None
    return "tag"


def _latin1(text: str) -> bool:
    try:
        text.encode("latin-1")
    except UnicodeEncodeError:
        return False
    return True


def routes(fender: AdminHost) -> list[Route]:
    def store():
        return fender.dataplane.runtime.exposed.get("cache", {}).get("store")

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
                if (fleet := fender.dataplane.runtime.exposed.get("state", {}).get("redis"))
                else None,
            }
        )

    async def purge(request: Request) -> Response:
        try:
            body = json.loads(await request.body() or b"{}")
        except ValueError:
            return JSONResponse({"error": "body must be JSON"}, status_code=400)
        kind = _purge_kind(body)
        if kind is None:
            return JSONResponse(
                {
                    "error": 'give exactly one of {"url": "http://host/path?query"}, {"prefix": "/path/"} '
                    f'or {{"tags": ["tag", ...]}} (at most {MAX_PURGE_TAGS} tags of {MAX_TAG_LENGTH} '
                    "bytes each, none empty or with spaces or commas)"
                },
                status_code=400,
            )
        metrics = fender.metrics
        metrics.cache_purges.labels(kind, "admin").inc()
        s = store()
        # Fleet mode: purges also reach Redis and every other sidecar.
        fleet = fender.dataplane.runtime.exposed.get("state", {}).get("redis")
        dropped: list[bytes] = []
        if kind == "url":
            host, target = _split(body["url"])
            wanted = {normalise_query(target, mode) for mode in ("as-is", "sorted", "ignore")}
            if s is not None:
                for key in s.keys():
                    key_host, key_target = target_of(key)
                    if key_target in wanted and (host is None or key_host == host) and s.delete(key):
                        dropped.append(key)
            metrics.cache_purged.labels(kind, "l1").inc(len(dropped))
            if fleet is None:
                return JSONResponse({"purged": len(dropped)})
            keys = set(dropped)
            if host is not None:
                keys.update(host + t for t in wanted)  # in Redis even when this sidecar has none
            sent = await fleet.invalidate(sorted(keys))
            return JSONResponse({"purged": len(dropped), "fleet": sent})
        if kind == "prefix":
            host, prefix = _split(body["prefix"])
            if s is not None:
                dropped = drop_prefix(s, host, prefix)
            values = [(host or b"") + b" " + prefix]
        else:
            tags = [t.encode("latin-1") for t in body["tags"]]
            if s is not None:
                dropped = drop_tags(s, tags)
            values = tags
        metrics.cache_purged.labels(kind, "l1").inc(len(dropped))
        if fleet is None:
            return JSONResponse({"purged": len(dropped)})
        l2 = await fleet.purge(kind, values)
        return JSONResponse({"purged": len(dropped), "fleet": l2 is not None, "fleet_purged": l2 or 0})

    return [
        Route("/admin/cache", state, methods=["GET"]),
        Route("/admin/cache/purge", purge, methods=["POST"]),
    ]
