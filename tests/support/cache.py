"""Cache tests' helpers: a scripted origin, a Fender with a cache route, and the fixtures both cache test files use."""

from __future__ import annotations

import asyncio

import pytest

from proxy.clock import ManualClock
from proxy.policies.cache import rfc9111 as rfc
from tests.conftest import policy_text
from tests.support.raw_upstream import RawUpstream


class Origin:
    """A scripted upstream: ``script[path]`` is ``(status, headers, body)`` or ``fn(request) -> that``."""

    def __init__(self) -> None:
        self.script: dict = {}
        self.gate: asyncio.Event | None = None  # when set, responses wait for it
        self.up: RawUpstream | None = None

    async def handle(self, req, conn) -> None:
        if self.gate is not None:
            await self.gate.wait()
        path = req.target.decode().split("?")[0]
        spec = self.script.get(path, (200, [("cache-control", "max-age=60")], b"default"))
        status, headers, body = spec(req) if callable(spec) else spec
        await conn.send(status, headers, body)

    def calls(self, path: str | None = None) -> list:
        return [r for r in self.up.requests if path is None or r.target.decode().split("?")[0] == path]


@pytest.fixture
async def origin():
    o = Origin()
    async with RawUpstream(o.handle) as up:
        o.up = up
        yield o


async def cached_fender(start_fender, origin, clock, route_cache: str = "", store: str = ""):
    text = policy_text(origin.up.port, routes=CACHE_ROUTE % route_cache)
    if store:
        text = f"cache: {{{store}}}\n" + text
    return await start_fender(text, clock=clock)


def metric(fender, name: str, **labels) -> float:
    total = 0.0
    for family in fender.metrics.registry.collect():
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


@pytest.fixture
def clock():
    return ManualClock()


NOW = 1_700_000_000.0  # wall-clock seconds used as "now" in the pure-function tests


def analyse(headers, status=200, *, authorized=False, request_time=NOW, response_time=NOW, default_ttl=0.0):
    return rfc.analyse(
        status,
        [(n.encode(), v.encode() if isinstance(v, str) else v) for n, v in headers],
        request_authorized=authorized,
        request_no_store=False,
        request_time=request_time,
        response_time=response_time,
        default_ttl=default_ttl,
    )


CACHE_ROUTE = """
- name: cached
  upstream: echo
  cache: {%s}
"""
