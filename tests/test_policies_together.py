"""Policies working together on one route, through the real data path."""

from __future__ import annotations

import httpx

from proxy.clock import ManualClock
from tests.support.raw_upstream import RawUpstream, ok, status


async def test_stale_if_error_covers_failures_and_an_open_breaker(start_fender):
    """Upstream fails: the breaker counts it and opens; the cache keeps answering with the stale copy."""
    behaviour = {"handler": ok(b"catalog v1", headers=[("cache-control", "max-age=1")])}

    async def switchable(req, conn):
        await behaviour["handler"](req, conn)

    clock = ManualClock()
    async with RawUpstream(switchable) as up:
        fender = await start_fender(
            f"""
listen: 127.0.0.1:0
admin: 127.0.0.1:0
upstreams:
  catalog: {{replicas: [{{url: http://127.0.0.1:{up.port}}}]}}
routes:
  - name: catalog
    upstream: catalog
    cache: {{stale_if_error: 5m}}
    circuit_breaker: {{consecutive_failures: 2, open_for: 10s}}
""",
            clock=clock,
        )
        async with httpx.AsyncClient() as client:
            first = await client.get(fender.url + "/item")
            assert first.status_code == 200 and first.content == b"catalog v1"
            clock.advance(5)  # the stored copy is now stale
            behaviour["handler"] = status(503, b"down")
            answers = [await client.get(fender.url + "/item") for _ in range(4)]
            breakers = (await client.get(fender.admin_url + "/admin/breakers")).json()
    assert [a.status_code for a in answers] == [200] * 4
    assert all(a.content == b"catalog v1" for a in answers)
    for answer in answers:
        assert answer.headers["cache-status"] == "fender; fwd=stale; fwd-status=503; detail=stale-if-error"
    # 1 fill + 2 failures that tripped the breaker; while open, the upstream is not called at all
    assert len(up.requests) == 3
    assert [(b["name"], b["state"]) for b in breakers["breakers"]] == [("catalog", "open")]
